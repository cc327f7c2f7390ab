// Network diagnostics for operators: `weft stun`.
#pragma once

#include <string>
#include <vector>

namespace weft {

// Prints this host's reflexive address and NAT mapping behaviour as the servers see it.
int cmd_stun(const std::vector<std::string>& servers, const std::string& bind,
             const std::string& timeout, bool json_output);

}  // namespace weft
