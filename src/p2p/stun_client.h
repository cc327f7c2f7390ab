// Asks STUN servers, from one local UDP socket, where that socket's packets come from. One
// answer gives the reflexive address; a second server (or the first one's OTHER-ADDRESS)
// tells whether the NAT's mapping depends on the destination, which decides whether hole
// punching can work (endpoint-independent) or the relay must carry the traffic (symmetric).
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/ip/udp.hpp>

#include "core/duration.h"
#include "core/result.h"

namespace weft {

struct NatReport {
  boost::asio::ip::udp::endpoint local;
  boost::asio::ip::udp::endpoint reflexive;
  // The second server's view, when there was one to ask.
  std::optional<boost::asio::ip::udp::endpoint> second_server, second_reflexive;
  std::string server_software;

  bool mapping_known() const { return second_reflexive.has_value(); }
  bool mapping_varies() const { return second_reflexive && *second_reflexive != reflexive; }
  bool behind_nat() const { return reflexive != local; }
  std::string mapping() const;  // "endpoint-independent", "endpoint-dependent" or "unknown"
};

// Binding requests are retransmitted (RFC 8489's doubling from `rto`) until `timeout`.
Result<NatReport> probe_nat(const std::vector<boost::asio::ip::udp::endpoint>& servers,
                            const boost::asio::ip::udp::endpoint& local_bind,
                            Millis timeout = std::chrono::seconds(3),
                            Millis rto = std::chrono::milliseconds(250));

}  // namespace weft
