#include "agent/nat_discovery.h"

#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <cstring>

#include "core/host_port.h"
#include "p2p/stun_client.h"

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;

namespace {

// Addresses of interfaces that are up: IPv4 (not loopback), and IPv6 that is routable (global
// or unique-local; link-local ones need an interface scope a peer cannot know). IPv6 usually
// crosses no NAT, so these are often the direct path (as Tailscale's endpoints).
std::vector<std::string> interface_addresses() {
  std::vector<std::string> out;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return out;
  for (ifaddrs* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr || !(i->ifa_flags & IFF_UP) || (i->ifa_flags & IFF_LOOPBACK)) continue;
    if (i->ifa_addr->sa_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
      out.push_back(asio::ip::address_v4(ntohl(sin->sin_addr.s_addr)).to_string());
    } else if (i->ifa_addr->sa_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(i->ifa_addr);
      asio::ip::address_v6::bytes_type b;
      std::memcpy(b.data(), &sin6->sin6_addr, 16);
      const asio::ip::address_v6 a(b);
      if (a.is_link_local() || a.is_loopback() || a.is_v4_mapped() || a.is_multicast() ||
          a.is_unspecified())
        continue;
      out.push_back(a.to_string());
    }
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
      HostPort{report.reflexive.address().to_string(), report.reflexive.port()}.to_string();
  out.mapping = report.mapping();
  out.candidates.push_back(out.reflexive);
  for (const auto& a : interface_addresses()) {
    if (out.candidates.size() >= 16) break;  // what control accepts (a host may have many IPv6)
    auto c = HostPort{a, report.local.port()}.to_string();
    if (c != out.reflexive) out.candidates.push_back(std::move(c));
  }
  return out;
}

}  // namespace weft
