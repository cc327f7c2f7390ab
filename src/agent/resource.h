// A resource, in the mesh-agent seed's JSON shape: a backend (target_host:target_port) that the
// agent exposes on mesh_port. Decoding is strict: unknown fields, wrong types, ports outside
// 1-65535 and bad host names are errors naming the field.
#pragma once

#include <cstdint>
#include <string>

#include <boost/json/object.hpp>

#include "core/result.h"

namespace weft {

struct Resource {
  std::string id;
  std::string name;
  std::string mesh_ip;
  uint16_t mesh_port = 0;
  std::string target_host;
  uint16_t target_port = 0;
  std::string protocol = "tcp";  // tcp, http or https
  std::string agent_id;
  bool enabled = true;

  boost::json::object to_json() const;
};

struct FieldError {
  std::string field;
  std::string message;
};

// Decodes a request body. Missing id is generated; missing mesh_ip/agent_id are the agent's.
Result<Resource> decode_resource(std::string_view body, FieldError& error);

// "local_port:host:port" as in --proxies.
Result<Resource> parse_proxy_rule(std::string_view rule);

}  // namespace weft
