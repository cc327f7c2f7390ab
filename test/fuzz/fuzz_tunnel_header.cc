#include "fuzz_targets.h"
#include "transport/quic/quic_tunnel.h"

// Hostile first bytes of a P2P tunnel stream, from either side: the request and response
// parsers must never crash, never claim more bytes than they were given, and what they accept
// must round-trip through the encoders.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  size_t used = 0;
  auto req = weft::quic::parse_request(data, size, used);
  if (req && *req) {
    if (used > size) __builtin_trap();
    const auto again = weft::quic::encode_request((*req)->authority);
    size_t used2 = 0;
    auto back = weft::quic::parse_request(again.data(), again.size(), used2);
    if (!back || !*back || (*back)->authority != (*req)->authority || used2 != again.size())
      __builtin_trap();
  }
  used = 0;
  auto resp = weft::quic::parse_response(data, size, used);
  if (resp && *resp) {
    if (used > size) __builtin_trap();
    const auto again = weft::quic::encode_response((*resp)->status, (*resp)->reason);
    size_t used2 = 0;
    auto back = weft::quic::parse_response(again.data(), again.size(), used2);
    if (!back || !*back || (*back)->status != (*resp)->status || (*back)->reason != (*resp)->reason)
      __builtin_trap();
  }
  return 0;
}
