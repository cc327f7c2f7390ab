#include "proxy/capture/iptables_rules.h"

#include <algorithm>

#include <boost/asio/ip/address.hpp>

namespace weft::iptables {

namespace {

bool is_v6_cidr(const std::string& cidr) { return cidr.find(':') != std::string::npos; }

Step run(Command c) { return Step{std::move(c), false, {}, false}; }
Step tolerate(Command c) { return Step{std::move(c), false, {}, true}; }
Step unless_present(Command check, Command add) {
  return Step{std::move(add), true, std::move(check), false};
}

}  // namespace

std::string validate(const CaptureRules& r) {
  for (const auto& cidr : r.exclude_cidrs) {
    const auto slash = cidr.find('/');
    boost::system::error_code ec;
    const auto addr = boost::asio::ip::make_address(cidr.substr(0, slash), ec);
    int bits = -1;
    if (!ec && slash != std::string::npos) {
      try {
        size_t used = 0;
        bits = std::stoi(cidr.substr(slash + 1), &used);
        if (used != cidr.size() - slash - 1) bits = -1;
      } catch (const std::exception&) {
        bits = -1;
      }
    } else if (!ec) {
      bits = addr.is_v4() ? 32 : 128;
    }
    if (ec || bits < 0 || bits > (addr.is_v4() ? 32 : 128))
      return "--exclude-cidrs: '" + cidr + "' is not an address or CIDR (e.g. 10.0.0.0/8)";
  }
  for (auto p : r.exclude_ports)
    if (p == 0) return "--exclude-ports: port 0 is not a port";
  if (r.outbound_port == 0 || (r.inbound && r.inbound_port == 0))
    return "the redirect ports must be 1-65535";
  return "";
}

std::vector<Step> install_plan(const CaptureRules& r, bool ipv6) {
  std::vector<Step> s;
  const std::string uid = std::to_string(r.proxy_uid);
  s.push_back(tolerate({"-t", "nat", "-N", "WEFT_OUTPUT"}));
  s.push_back(run({"-t", "nat", "-F", "WEFT_OUTPUT"}));
  // The proxy's own connections (to upstreams, to peers) go out as they are.
  s.push_back(
      run({"-t", "nat", "-A", "WEFT_OUTPUT", "-m", "owner", "--uid-owner", uid, "-j", "RETURN"}));
  // Loopback stays local: admin ports, the agent API, the SDS socket's neighbours.
  s.push_back(run(
      {"-t", "nat", "-A", "WEFT_OUTPUT", "-d", ipv6 ? "::1/128" : "127.0.0.0/8", "-j", "RETURN"}));
  for (auto p : r.exclude_ports)
    s.push_back(run({"-t", "nat", "-A", "WEFT_OUTPUT", "-p", "tcp", "--dport", std::to_string(p),
                     "-j", "RETURN"}));
  for (const auto& cidr : r.exclude_cidrs)
    if (is_v6_cidr(cidr) == ipv6)
      s.push_back(run({"-t", "nat", "-A", "WEFT_OUTPUT", "-d", cidr, "-j", "RETURN"}));
  s.push_back(run({"-t", "nat", "-A", "WEFT_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                   std::to_string(r.outbound_port)}));
  s.push_back(unless_present({"-t", "nat", "-C", "OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"},
                             {"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"}));
  if (r.inbound) {
    s.push_back(tolerate({"-t", "nat", "-N", "WEFT_INBOUND"}));
    s.push_back(run({"-t", "nat", "-F", "WEFT_INBOUND"}));
    for (auto p : r.exclude_inbound_ports)
      s.push_back(run({"-t", "nat", "-A", "WEFT_INBOUND", "-p", "tcp", "--dport", std::to_string(p),
                       "-j", "RETURN"}));
    s.push_back(run({"-t", "nat", "-A", "WEFT_INBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                     std::to_string(r.inbound_port)}));
    s.push_back(
        unless_present({"-t", "nat", "-C", "PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"},
                       {"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"}));
  } else {
    // Installing without --inbound removes inbound capture a previous install set up.
    for (auto& step : remove_plan(ipv6))
      if (std::find(step.command.begin(), step.command.end(), "WEFT_INBOUND") != step.command.end())
        s.push_back(step);
  }
  return s;
}

std::vector<Step> remove_plan(bool) {
  std::vector<Step> s;
  // Deleting a jump that is not there fails: that is fine (remove is idempotent too). Jumps
  // are deleted before their chains, and repeatedly, in case something added one twice.
  for (int i = 0; i < 4; ++i) {
    s.push_back(tolerate({"-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"}));
    s.push_back(tolerate({"-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"}));
  }
  for (const char* chain : {"WEFT_OUTPUT", "WEFT_INBOUND"}) {
    s.push_back(tolerate({"-t", "nat", "-F", chain}));
    s.push_back(tolerate({"-t", "nat", "-X", chain}));
  }
  return s;
}

}  // namespace weft::iptables
