#include <string_view>

#include "fuzz_targets.h"
#include "proxy/http/hmac_signing.h"

// A hostile x-weft-signature header: parsed or refused with a reason; verification of garbage
// never accepts it and never takes a nonce slot.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  auto p = weft::parse_signature(in);
  if (p && (p->sig.size() != 64 || p->nonce.size() < 16)) __builtin_trap();
  static weft::NonceCache nonces(std::chrono::seconds(600), 1000);
  const std::string verdict = weft::verify_request(
      "0123456789abcdef", in, "GET", "/", "", [](const std::string&) { return std::string(); },
      1700000000, std::chrono::seconds(300), nonces);
  if (verdict.empty()) __builtin_trap();  // nobody can forge a signature by fuzzing
  // As the header of an HTTP/2 stream whose body follows (body=trailer), and its trailer.
  const std::string streamed = weft::verify_request(
      "0123456789abcdef", in, "POST", "/", std::nullopt,
      [](const std::string&) { return std::string(); }, 1700000000, std::chrono::seconds(300),
      nonces);
  if (streamed.empty()) __builtin_trap();
  if (weft::body_signature_matches("0123456789abcdef", in, weft::sha256_hex(""), in))
    __builtin_trap();
  return 0;
}
