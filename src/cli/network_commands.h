// Network commands for operators: `weft stun` (diagnostics) and `weft iptables` (capture).
#pragma once

#include <string>
#include <vector>

#include "proxy/capture/iptables_rules.h"

namespace weft {

// Prints this host's reflexive address and NAT mapping behaviour as the servers see it.
int cmd_stun(const std::vector<std::string>& servers, const std::string& bind,
             const std::string& timeout, bool json_output);

// Installs (idempotently) or removes the transparent-capture rules; "auto" ipv6 means: when
// ip6tables has a nat table here. Prints each rule it adds; returns the exit code.
int cmd_iptables(bool install, const iptables::CaptureRules& rules, const std::string& ipv6,
                 bool dry_run);

}  // namespace weft
