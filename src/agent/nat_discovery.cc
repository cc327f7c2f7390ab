#include "agent/nat_discovery.h"

#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>

#include "p2p/stun_client.h"

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;

namespace {

// Non-loopback IPv4 addresses of interfaces that are up.
std::vector<std::string> interface_addresses() {
  std::vector<std::string> out;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return out;
  for (ifaddrs* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
    if (!(i->ifa_flags & IFF_UP) || (i->ifa_flags & IFF_LOOPBACK)) continue;
    const auto* sin = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    out.push_back(asio::ip::address_v4(ntohl(sin->sin_addr.s_addr)).to_string());
  }
  ::freeifaddrs(list);
  return out;
}

}  // namespace

Result<NatCandidates> discover_nat(const std::string& stun_host, uint16_t stun_port,
                                   uint16_t local_port, int timeout_ms) {
  asio::io_context io;
  udp::resolver resolver(io);
  boost::system::error_code ec;
  auto found = resolver.resolve(udp::v4(), stun_host, std::to_string(stun_port), ec);
  if (ec || found.empty()) return make_error("cannot resolve STUN server " + stun_host);
  const udp::endpoint server = *found.begin();
  auto report = probe_nat({server}, udp::endpoint(udp::v4(), local_port),
                          std::chrono::milliseconds(timeout_ms));
  if (!report && local_port != 0)  // the port is taken (a QUIC endpoint of an older agent)
    report =
        probe_nat({server}, udp::endpoint(udp::v4(), 0), std::chrono::milliseconds(timeout_ms));
  if (!report) return make_error(report.error());
  return candidates_from(*report);
}

NatCandidates candidates_from(const NatReport& report) {
  NatCandidates out;
  out.reflexive =
      report.reflexive.address().to_string() + ":" + std::to_string(report.reflexive.port());
  out.mapping = report.mapping();
  out.candidates.push_back(out.reflexive);
  const std::string port = std::to_string(report.local.port());
  for (const auto& a : interface_addresses())
    if (a + ":" + port != out.reflexive) out.candidates.push_back(a + ":" + port);
  return out;
}

}  // namespace weft
