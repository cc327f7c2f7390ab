#include <boost/asio/ip/udp.hpp>

#include "fuzz_targets.h"
#include "p2p/stun.h"

// Hostile datagrams on the STUN port: parse must never crash or read out of bounds, and what
// it accepts must survive our own encoding of an answer to it.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)weft::stun::looks_like_stun(data, size);
  auto m = weft::stun::parse(data, size);
  if (!m) return 0;
  const boost::asio::ip::udp::endpoint peer(boost::asio::ip::make_address("192.0.2.7"), 40000);
  const auto answer = weft::stun::binding_success(m->transaction, peer, m->other_address, peer);
  auto back = weft::stun::parse(answer.data(), answer.size());
  if (!back || back->transaction != m->transaction || back->reflexive() != peer ||
      !back->has_fingerprint)
    __builtin_trap();
  return 0;
}
