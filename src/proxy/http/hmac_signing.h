// HMAC request signatures between proxies. The outbound proxy adds
//   x-weft-signature: v1;ts=<unix seconds>;nonce=<32 hex>;headers=<h1,h2>;sig=<64 hex>
// where sig = HMAC-SHA256(key, canonical) and canonical is
//   "v1\n" method "\n" target "\n" ts "\n" nonce "\n" (name ":" value "\n")* sha256hex(body)
// The inbound proxy recomputes it with the key of the calling identity, refuses a timestamp
// more than max_skew away (stale), a nonce it has seen within the window (replay) and any
// other difference (tampered), each with 401 and a reason.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
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
};

// The header value to add.
std::string sign_request(std::string_view key, const SignedRequest& req, int64_t unix_seconds,
                         std::string_view nonce_hex);

struct ParsedSignature {
  int64_t ts = 0;
  std::string nonce, sig;
  std::vector<std::string> headers;
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
// Returns "" when valid, else the 401 reason: "stale: ...", "replayed: ...", "tampered: ..."
// or what is malformed.
std::string verify_request(std::string_view key, std::string_view header, std::string_view method,
                           std::string_view target, std::string_view body,
                           const std::function<std::string(const std::string&)>& headers_of,
                           int64_t now_seconds, std::chrono::seconds max_skew, NonceCache& nonces);

}  // namespace weft
