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
  // As the header of an HTTP/2 stream whose body follows in signed chunks (body=chunks).
  const std::string streamed = weft::verify_request(
      "0123456789abcdef", in, "POST", "/", std::nullopt,
      [](const std::string&) { return std::string(); }, 1700000000, std::chrono::seconds(300),
      nonces);
  if (streamed.empty()) __builtin_trap();
  // As a body in signed chunks (the corpus has well-signed ones under kChunkHeader): fed
  // whole or in two pieces, the same verdict and the same payload, never more than was sent.
  static const std::string kChunkHeader =
      "v1;ts=1700000000;nonce=00112233445566778899aabbccddeeff;headers=;body=chunks;sig=" +
      std::string(64, 'a');
  weft::ChunkVerifier whole("0123456789abcdef", kChunkHeader), split = whole;
  std::string out_whole, out_split;
  const auto r1 = whole.feed(in, out_whole);
  auto r2 = split.feed(in.substr(0, size / 2), out_split);
  size_t used2 = r2 ? *r2 : 0;
  if (r2) {
    r2 = split.feed(in.substr(size / 2), out_split);
    if (r2) used2 += *r2;
  }
  if (bool(r1) != bool(r2) || out_whole.size() > size) __builtin_trap();
  if (r1 && (out_whole != out_split || *r1 != used2 || whole.complete() != split.complete()))
    __builtin_trap();
  return 0;
}
