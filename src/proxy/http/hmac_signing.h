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
//   x-weft-signature: v1;ts=..;nonce=..;headers=..;body=trailer;sig=<64 hex>
// whose canonical text ends in the word "trailer" instead of the digest, and the stream ends
// with the trailer
//   x-weft-body-signature: <64 hex> = HMAC-SHA256(key, "v1-body\n" sig "\n" sha256hex(body))
// which binds the body to that header signature. The verifier checks the header before
// anything goes on, hashes the body as it passes, and holds the end of the stream until the
// trailer matches: an app never sees a whole request whose body was changed.
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
  // The body's digest goes in the x-weft-body-signature trailer (`body` is not used).
  bool body_in_trailer = false;
};

inline constexpr std::string_view kBodySignatureTrailer = "x-weft-body-signature";

// The header value to add.
std::string sign_request(std::string_view key, const SignedRequest& req, int64_t unix_seconds,
                         std::string_view nonce_hex);

// The x-weft-body-signature value for a body signed apart; `header` is the x-weft-signature
// value it belongs to.
std::string body_signature(std::string_view key, std::string_view header,
                           std::string_view body_sha256_hex);

struct ParsedSignature {
  int64_t ts = 0;
  std::string nonce, sig;
  std::vector<std::string> headers;
  bool body_in_trailer = false;
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
// signature must then be body=trailer, checked at the end by body_signature_matches).
// Returns "" when valid, else the 401 reason: "stale: ...", "replayed: ...", "tampered: ..."
// or what is malformed.
std::string verify_request(std::string_view key, std::string_view header, std::string_view method,
                           std::string_view target, std::optional<std::string_view> body,
                           const std::function<std::string(const std::string&)>& headers_of,
                           int64_t now_seconds, std::chrono::seconds max_skew, NonceCache& nonces);

// The trailer of a body=trailer request, in constant time.
bool body_signature_matches(std::string_view key, std::string_view header,
                            std::string_view body_sha256_hex, std::string_view trailer_value);

}  // namespace weft
