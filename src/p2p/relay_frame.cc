#include "p2p/relay_frame.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include <cstring>

#include "identity/openssl_ptr.h"

namespace weft::relay {

namespace {

constexpr size_t kHeader = 4;

bool known(uint8_t t) { return t >= 0x01 && t <= 0x09; }

template <size_t N>
void append(std::vector<uint8_t>& out, const std::array<uint8_t, N>& a) {
  out.insert(out.end(), a.begin(), a.end());
}

}  // namespace

std::vector<uint8_t> encode(FrameType type, const uint8_t* payload, size_t len) {
  std::vector<uint8_t> out;
  out.reserve(kHeader + len);
  out.push_back(static_cast<uint8_t>(type));
  out.push_back(static_cast<uint8_t>(len >> 16));
  out.push_back(static_cast<uint8_t>(len >> 8));
  out.push_back(static_cast<uint8_t>(len));
  if (len) out.insert(out.end(), payload, payload + len);
  return out;
}

std::vector<uint8_t> challenge_frame(const Challenge& c) {
  return encode(FrameType::server_challenge, c.data(), c.size());
}

std::vector<uint8_t> proof_frame(const NodeKey& key, const Signature& sig) {
  std::vector<uint8_t> p;
  append(p, key);
  append(p, sig);
  return encode(FrameType::client_proof, p.data(), p.size());
}

std::vector<uint8_t> packet_frame(FrameType send_or_recv, const NodeKey& peer, const uint8_t* data,
                                  size_t len) {
  std::vector<uint8_t> out;
  const size_t payload = peer.size() + len;
  out.reserve(kHeader + payload);
  out.push_back(static_cast<uint8_t>(send_or_recv));
  out.push_back(static_cast<uint8_t>(payload >> 16));
  out.push_back(static_cast<uint8_t>(payload >> 8));
  out.push_back(static_cast<uint8_t>(payload));
  append(out, peer);
  if (len) out.insert(out.end(), data, data + len);
  return out;
}

std::vector<uint8_t> error_frame(const std::string& reason) {
  return encode(FrameType::error, reinterpret_cast<const uint8_t*>(reason.data()),
                std::min(reason.size(), size_t{1024}));
}

Result<Challenge> parse_challenge(const Frame& f) {
  Challenge c{};
  if (f.type != FrameType::server_challenge || f.payload.size() != c.size())
    return make_error("expected a 32-byte challenge");
  std::memcpy(c.data(), f.payload.data(), c.size());
  return c;
}

Result<Proof> parse_proof(const Frame& f) {
  Proof p{};
  if (f.type != FrameType::client_proof || f.payload.size() != p.key.size() + p.signature.size())
    return make_error("expected a proof: a 32-byte key and a 64-byte signature");
  std::memcpy(p.key.data(), f.payload.data(), p.key.size());
  std::memcpy(p.signature.data(), f.payload.data() + p.key.size(), p.signature.size());
  return p;
}

Result<Packet> parse_packet(const Frame& f) {
  Packet p{};
  if (f.type != FrameType::send_packet && f.type != FrameType::recv_packet)
    return make_error("not a packet frame");
  if (f.payload.size() < p.peer.size()) return make_error("packet frame shorter than a node key");
  std::memcpy(p.peer.data(), f.payload.data(), p.peer.size());
  p.data = f.payload.data() + p.peer.size();
  p.len = f.payload.size() - p.peer.size();
  if (p.len == 0) return make_error("empty packet");
  return p;
}

std::vector<uint8_t> proof_message(const Challenge& c, const std::array<uint8_t, 32>& exporter) {
  std::vector<uint8_t> m(kProofContext, kProofContext + sizeof kProofContext - 1);
  append(m, c);
  append(m, exporter);
  return m;
}

Result<std::array<uint8_t, 32>> tls_exporter(SSL* ssl) {
  std::array<uint8_t, 32> out{};
  static const char kLabel[] = "EXPORTER-weft-relay";
  if (SSL_export_keying_material(ssl, out.data(), out.size(), kLabel, sizeof kLabel - 1, nullptr, 0,
                                 0) != 1)
    return make_error("cannot export keying material from the TLS connection");
  return out;
}

Result<std::vector<uint8_t>> sign_proof(const std::string& private_pem, const Challenge& c,
                                        const std::array<uint8_t, 32>& exporter) {
  ossl::Bio bio(BIO_new_mem_buf(private_pem.data(), static_cast<int>(private_pem.size())));
  ossl::Key key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key || EVP_PKEY_get_id(key.get()) != EVP_PKEY_ED25519)
    return make_error("the node key is not an Ed25519 private key");
  NodeKey pub{};
  size_t pub_len = pub.size();
  if (EVP_PKEY_get_raw_public_key(key.get(), pub.data(), &pub_len) != 1)
    return make_error("cannot read the node's public key");
  const auto message = proof_message(c, exporter);
  Signature sig{};
  size_t sig_len = sig.size();
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = EVP_DigestSignInit(ctx, nullptr, nullptr, nullptr, key.get()) == 1 &&
                  EVP_DigestSign(ctx, sig.data(), &sig_len, message.data(), message.size()) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok || sig_len != sig.size()) return make_error("signing the relay proof failed");
  return proof_frame(pub, sig);
}

void FrameReader::feed(const uint8_t* data, size_t len) {
  if (consumed_ && consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  }
  buffer_.insert(buffer_.end(), data, data + len);
}

Result<std::optional<Frame>> FrameReader::next() {
  const size_t avail = buffer_.size() - consumed_;
  if (avail < kHeader) return std::optional<Frame>();
  const uint8_t* h = buffer_.data() + consumed_;
  if (!known(h[0])) return make_error("unknown relay frame type " + std::to_string(h[0]));
  const size_t len = static_cast<size_t>(h[1]) << 16 | static_cast<size_t>(h[2]) << 8 | h[3];
  if (len > kMaxPayload)
    return make_error("relay frame of " + std::to_string(len) + " bytes is over the " +
                      std::to_string(kMaxPayload) + "-byte limit");
  if (avail < kHeader + len) return std::optional<Frame>();
  Frame f;
  f.type = static_cast<FrameType>(h[0]);
  f.payload.assign(h + kHeader, h + kHeader + len);
  consumed_ += kHeader + len;
  // Keep the buffer from growing with what was already handed out.
  if (consumed_ > 64 * 1024) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(consumed_));
    consumed_ = 0;
  }
  return std::optional<Frame>(std::move(f));
}

std::vector<uint8_t> take_batch(std::deque<std::vector<uint8_t>>& queue, size_t& queued,
                                size_t limit) {
  std::vector<uint8_t> out = std::move(queue.front());
  queue.pop_front();
  while (!queue.empty() && out.size() + queue.front().size() <= limit) {
    out.insert(out.end(), queue.front().begin(), queue.front().end());
    queue.pop_front();
  }
  queued -= out.size();
  return out;
}

}  // namespace weft::relay
