// HMAC request signatures between proxies. The outbound proxy adds
//   x-weft-signature: v1;ts=<unix seconds>;nonce=<32 hex>;headers=<h1,h2>;sig=<64 hex>
// where sig = HMAC-SHA256(key, canonical) and canonical is
//   "v1\n" method "\n" target "\n" ts "\n" nonce "\n" (name ":" value "\n")* sha256hex(body)
// The inbound proxy recomputes it with the key of the calling identity, refuses a timestamp
// more than max_skew away (stale), a nonce it has seen within the window (replay) and any
// other difference (tampered), each with 401 and a reason.
//
// An HTTP/2 stream with a body is forwarded as it comes (gRPC streams may never end before
// the answer starts), so its header cannot hold the body's digest. It is signed with
//   x-weft-signature: v1;ts=..;nonce=..;headers=..;body=chunks;sig=<64 hex>
// whose canonical text ends in the word "chunks" instead of the digest, and between the
// proxies the body travels as signed chunks, each MAC chained to the one before and the first
// to the header's sig (as AWS SigV4 signs a streamed upload):
//   frame   = length (4 bytes, big-endian) mac (64 hex) payload
//   mac_i   = HMAC-SHA256(key, "v1-chunk\n" prev "\n" payload),  prev = sig, then mac_(i-1)
// and the last frame has an empty payload, so a body cut short is told from a whole one. The
// verifier checks the header before anything goes on and each chunk before its payload goes
// on: no byte of a changed, reordered, spliced or truncated body reaches the app, even on a
// stream that runs both ways for hours.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/result.h"
#include "identity/digest.h"

namespace weft {

struct SignedRequest {
  std::string_view method, target, body;
  std::vector<std::pair<std::string, std::string>> headers;  // (lower-case name, value) in order
  // The body comes as signed chunks (ChunkSigner; `body` is not used).
  bool body_in_chunks = false;
};

// The header value to add.
std::string sign_request(std::string_view key, const SignedRequest& req, int64_t unix_seconds,
                         std::string_view nonce_hex);

// The chunks of a body=chunks body. `header` is the x-weft-signature value they belong to.
inline constexpr size_t kChunkHeaderSize = 4 + 64;
inline constexpr size_t kMaxChunkPayload = 64 * 1024;  // the signer sends at most kSignedChunk
inline constexpr size_t kSignedChunk = 16 * 1024;

class ChunkSigner {
 public:
  ChunkSigner() = default;
  ChunkSigner(std::string_view key, std::string_view header);
  // Appends the frame of `payload` (at most kMaxChunkPayload) to `out`; an empty payload is
  // the last frame.
  void frame(std::string_view payload, std::string& out);
  // A body that is whole already: its frames of up to kSignedChunk, then the last frame.
  void frame_whole(std::string_view body, std::string& out);

 private:
  std::string key_, prev_;
};

class ChunkVerifier {
 public:
  ChunkVerifier() = default;
  ChunkVerifier(std::string_view key, std::string_view header);
  // Takes framed bytes as they come; the payload of each frame that verifies is appended to
  // `out`, a part frame waits for the rest. Returns how many frame-header bytes were used up
  // (they go no further), or why the body is refused.
  Result<size_t> feed(std::string_view bytes, std::string& out);
  // The last frame came and nothing after it.
  bool complete() const { return ended_ && partial_.empty(); }

 private:
  std::string key_, prev_, partial_;
  bool ended_ = false;
};

struct ParsedSignature {
  int64_t ts = 0;
  std::string nonce, sig;
  std::vector<std::string> headers;
  bool body_in_chunks = false;
};
Result<ParsedSignature> parse_signature(std::string_view header);

// Remembers nonces for the skew window (twice max_skew); bounded, shared by the workers.
class NonceCache {
 public:
  explicit NonceCache(std::chrono::seconds window, size_t max_entries = 1 << 20)
      : window_(window), max_(max_entries) {}
  // False when `nonce` was seen within the window (a replay).
  bool insert(const std::string& nonce, int64_t now_seconds);

 private:
  std::mutex mutex_;
  std::chrono::seconds window_;
  size_t max_;
  std::unordered_map<std::string, int64_t> seen_;
  int64_t last_sweep_ = 0;
};

// Verifies; `headers_of(name)` returns the request's value of a header ("" if absent).
// `body` is the whole body, or nullopt for an HTTP/2 stream whose body follows (its
// signature must then be body=chunks, its chunks checked by a ChunkVerifier).
// Returns "" when valid, else the 401 reason: "stale: ...", "replayed: ...", "tampered: ..."
// or what is malformed.
std::string verify_request(std::string_view key, std::string_view header, std::string_view method,
                           std::string_view target, std::optional<std::string_view> body,
                           const std::function<std::string(const std::string&)>& headers_of,
                           int64_t now_seconds, std::chrono::seconds max_skew, NonceCache& nonces);

}  // namespace weft
