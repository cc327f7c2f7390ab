// Operator verbs that talk to a running control or agent: `weft status`, `weft resources`.
// Output is a readable table by default and JSON with -o json.
#pragma once

#include <string>
#include <vector>

namespace weft {

struct ControlTarget {
  std::string url;      // e.g. https://control:8443
  std::string token;    // operator token
  std::string ca_file;  // mesh CA bundle for https
};

struct AgentTarget {
  std::string url = "http://127.0.0.1:8081";
  std::string token;
};

int cmd_status(const ControlTarget& control, bool json_output);
int cmd_services(const ControlTarget& control, bool json_output);
int cmd_keys_create(const ControlTarget& control, const std::string& ttl, bool reusable,
                    const std::string& cluster, bool json_output);
int cmd_resources_list(const AgentTarget& agent, bool json_output);
int cmd_resources_add(const AgentTarget& agent, const std::string& id, int port,
                      const std::string& target, const std::string& protocol, bool json_output);
int cmd_resources_rm(const AgentTarget& agent, const std::string& id);

}  // namespace weft
