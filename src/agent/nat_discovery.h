// An agent's UDP candidates for peers: the addresses of its interfaces and the reflexive
// address a STUN server sees, all for the port its QUIC endpoint uses, and whether its NAT
// maps per destination. Published through control so peers know where to punch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/result.h"
#include "p2p/stun_client.h"

namespace weft {

struct NatCandidates {
  std::vector<std::string> candidates;  // "host:port", reflexive first
  std::string reflexive;
  std::string mapping;  // "endpoint-independent", "endpoint-dependent" or "unknown"
};

// The candidates a STUN report of the QUIC socket gives: reflexive first, then interfaces.
NatCandidates candidates_from(const NatReport& report);

// Blocking, at most `timeout_ms`. `local_port` 0, or in use: an ephemeral port.
Result<NatCandidates> discover_nat(const std::string& stun_host, uint16_t stun_port,
                                   uint16_t local_port, int timeout_ms = 2000);

}  // namespace weft
