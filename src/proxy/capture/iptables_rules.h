// The iptables rules behind transparent capture, as argument lists for iptables/ip6tables
// (whichever backend, nft or legacy, the host's `iptables` is). Our rules live in chains of
// their own (WEFT_OUTPUT, WEFT_INBOUND), so installing means: create the chains if missing,
// flush them, fill them, and add the jump from OUTPUT/PREROUTING only if it is not there —
// running it twice leaves the same rules. Removing deletes every jump and the chains.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace weft::iptables {

struct CaptureRules {
  uint32_t proxy_uid = 0;          // the proxy's own connections are never captured
  uint16_t outbound_port = 15001;  // where outbound connections are redirected
  bool inbound = false;
  uint16_t inbound_port = 15006;
  std::vector<uint16_t> exclude_ports;  // outbound destination ports left alone
  std::vector<uint16_t> exclude_inbound_ports{15008, 15000};  // HBONE, admin
  std::vector<std::string> exclude_cidrs;                     // outbound destinations left alone
};

using Command = std::vector<std::string>;  // arguments after the binary name

// `check` commands (-C / -L) tell whether something exists; the install plan runs them first.
struct Step {
  Command command;
  bool only_if_missing = false;  // run only when `check` fails
  Command check;
  bool may_fail = false;  // e.g. creating a chain that already exists
};

std::vector<Step> install_plan(const CaptureRules& rules, bool ipv6);
std::vector<Step> remove_plan(bool ipv6);

// Errors name the option: a CIDR that is not one, a port out of range.
std::string validate(const CaptureRules& rules);

}  // namespace weft::iptables
