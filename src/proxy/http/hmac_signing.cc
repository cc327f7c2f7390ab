#include "proxy/http/hmac_signing.h"

#include <openssl/crypto.h>

namespace weft {

namespace {

bool is_hex(std::string_view s) {
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

std::string sign_request(std::string_view key, const SignedRequest& req, int64_t ts,
                         std::string_view nonce) {
  std::string canonical = "v1\n";
  canonical.append(req.method).append("\n").append(req.target).append("\n");
  canonical.append(std::to_string(ts)).append("\n").append(nonce).append("\n");
  std::string names;
  for (const auto& [name, value] : req.headers) {
    canonical.append(name).append(":").append(value).append("\n");
    names += (names.empty() ? "" : ",") + name;
  }
  canonical.append(req.body_in_chunks ? std::string("chunks") : sha256_hex(req.body));
  return "v1;ts=" + std::to_string(ts) + ";nonce=" + std::string(nonce) + ";headers=" + names +
         (req.body_in_chunks ? ";body=chunks" : "") + ";sig=" + hmac_sha256_hex(key, canonical);
}

namespace {

// The sig field of a well-formed header ("" otherwise).
std::string sig_of(std::string_view header) {
  auto p = parse_signature(header);
  return p ? p->sig : std::string();
}

// A chunk's MAC, chained to the one before (hmac_signing.h).
std::string chunk_mac(std::string_view key, std::string_view prev, std::string_view payload) {
  std::string text = "v1-chunk\n";
  text.reserve(text.size() + prev.size() + 1 + payload.size());
  text.append(prev).append("\n").append(payload);
  return hmac_sha256_hex(key, text);
}

}  // namespace

ChunkSigner::ChunkSigner(std::string_view key, std::string_view header)
    : key_(key), prev_(sig_of(header)) {}

void ChunkSigner::frame(std::string_view payload, std::string& out) {
  const auto n = static_cast<uint32_t>(payload.size());
  const char length[4] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16),
                          static_cast<char>(n >> 8), static_cast<char>(n)};
  prev_ = chunk_mac(key_, prev_, payload);
  out.append(length, 4).append(prev_).append(payload);
}

void ChunkSigner::frame_whole(std::string_view body, std::string& out) {
  for (size_t off = 0; off < body.size(); off += kSignedChunk)
    frame(body.substr(off, kSignedChunk), out);
  frame({}, out);
}

ChunkVerifier::ChunkVerifier(std::string_view key, std::string_view header)
    : key_(key), prev_(sig_of(header)) {}

Result<size_t> ChunkVerifier::feed(std::string_view bytes, std::string& out) {
  size_t used = 0;
  // Whole frames straight from `bytes`; only a frame split across reads is copied first.
  std::string_view rest = bytes;
  if (!partial_.empty()) {
    partial_.append(bytes);
    rest = partial_;
  }
  size_t off = 0;
  while (rest.size() - off >= kChunkHeaderSize) {
    if (ended_) return make_error("tampered: body bytes after the last signed chunk");
    const auto* p = reinterpret_cast<const uint8_t*>(rest.data() + off);
    const size_t n = (size_t{p[0]} << 24) | (size_t{p[1]} << 16) | (size_t{p[2]} << 8) | p[3];
    if (n > kMaxChunkPayload)
      return make_error("malformed body: a signed chunk of " + std::to_string(n) +
                        " bytes (at most " + std::to_string(kMaxChunkPayload) + ")");
    if (rest.size() - off < kChunkHeaderSize + n) break;
    const std::string_view mac = rest.substr(off + 4, 64);
    const std::string_view payload = rest.substr(off + kChunkHeaderSize, n);
    std::string want = chunk_mac(key_, prev_, payload);
    if (CRYPTO_memcmp(want.data(), mac.data(), 64) != 0)
      return make_error("tampered: a body chunk does not match its signature");
    out.append(payload);
    prev_ = std::move(want);
    ended_ = n == 0;
    used += kChunkHeaderSize;
    off += kChunkHeaderSize + n;
  }
  if (ended_ && off < rest.size())
    return make_error("tampered: body bytes after the last signed chunk");
  if (partial_.empty())
    partial_.assign(rest.substr(off));
  else
    partial_.erase(0, off);
  return used;
}

Result<ParsedSignature> parse_signature(std::string_view h) {
  ParsedSignature p;
  if (h.empty()) return make_error("missing: no x-weft-signature header");
  if (h.size() > 4096) return make_error("malformed signature: over 4 KiB");
  if (h.substr(0, 3) != "v1;") return make_error("malformed signature: expected version v1");
  h.remove_prefix(3);
  bool have_ts = false, have_nonce = false, have_sig = false, have_headers = false;
  while (!h.empty()) {
    const auto semi = h.find(';');
    const std::string_view field = h.substr(0, semi);
    h = semi == std::string_view::npos ? std::string_view() : h.substr(semi + 1);
    const auto eq = field.find('=');
    if (eq == std::string_view::npos) return make_error("malformed signature: a field without '='");
    const std::string_view k = field.substr(0, eq), v = field.substr(eq + 1);
    if (k == "ts") {
      if (v.empty() || v.size() > 12) return make_error("malformed signature: bad ts");
      int64_t ts = 0;
      for (char c : v) {
        if (c < '0' || c > '9') return make_error("malformed signature: bad ts");
        ts = ts * 10 + (c - '0');
      }
      p.ts = ts;
      have_ts = true;
    } else if (k == "nonce") {
      if (v.size() < 16 || v.size() > 64 || !is_hex(v))
        return make_error("malformed signature: the nonce must be 16-64 lower-case hex digits");
      p.nonce = std::string(v);
      have_nonce = true;
    } else if (k == "headers") {
      std::string_view rest = v;
      while (!rest.empty()) {
        const auto comma = rest.find(',');
        const std::string_view name = rest.substr(0, comma);
        if (name.empty() || name.size() > 64)
          return make_error("malformed signature: bad header list");
        p.headers.emplace_back(name);
        rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
        if (p.headers.size() > 32) return make_error("malformed signature: over 32 headers");
      }
      have_headers = true;
    } else if (k == "body") {
      if (v != "chunks") return make_error("malformed signature: body must be 'chunks'");
      p.body_in_chunks = true;
    } else if (k == "sig") {
      if (v.size() != 64 || !is_hex(v))
        return make_error("malformed signature: sig must be 64 hex");
      p.sig = std::string(v);
      have_sig = true;
    } else {
      return make_error("malformed signature: unknown field '" + std::string(k) + "'");
    }
  }
  if (!have_ts || !have_nonce || !have_sig || !have_headers)
    return make_error("malformed signature: needs ts, nonce, headers and sig");
  return p;
}

bool NonceCache::insert(const std::string& nonce, int64_t now) {
  std::lock_guard lock(mutex_);
  const int64_t window = window_.count();
  if (now - last_sweep_ >= window / 4 + 1 || seen_.size() >= max_) {
    std::erase_if(seen_, [&](const auto& kv) { return now - kv.second > window; });
    last_sweep_ = now;
    // Still full of fresh entries: under a flood, refuse rather than forget (a forgotten
    // nonce would let a replay through).
    if (seen_.size() >= max_) return false;
  }
  return seen_.emplace(nonce, now).second;
}

std::string verify_request(std::string_view key, std::string_view header, std::string_view method,
                           std::string_view target, std::optional<std::string_view> body,
                           const std::function<std::string(const std::string&)>& headers_of,
                           int64_t now, std::chrono::seconds max_skew, NonceCache& nonces) {
  auto parsed = parse_signature(header);
  if (!parsed) return parsed.error();
  const int64_t skew = parsed->ts > now ? parsed->ts - now : now - parsed->ts;
  if (skew > max_skew.count())
    return "stale: signed " + std::to_string(skew) + " s away from now (at most " +
           std::to_string(max_skew.count()) + " s)";
  if (parsed->body_in_chunks && body)
    return body->empty() ? "tampered: body=chunks on a request without a body"
                         : "malformed signature: body=chunks needs an HTTP/2 target (protocol: "
                           "http2 or grpc), where the body can come in signed chunks";
  if (!parsed->body_in_chunks && !body)
    return "tampered: a streamed HTTP/2 body must come in signed chunks (body=chunks)";
  SignedRequest req{method, target, body.value_or(""), {}, parsed->body_in_chunks};
  for (const auto& name : parsed->headers) req.headers.emplace_back(name, headers_of(name));
  const std::string expected = sign_request(key, req, parsed->ts, parsed->nonce);
  const std::string_view want = std::string_view(expected).substr(expected.size() - 64);
  if (CRYPTO_memcmp(parsed->sig.data(), want.data(), 64) != 0)
    return "tampered: the signature does not match the request";
  // Only a valid signature takes a nonce slot: garbage cannot flush the cache.
  if (!nonces.insert(parsed->nonce, now)) return "replayed: nonce seen before";
  return "";
}

}  // namespace weft
