#include "agent/resource.h"

#include "control/join_keys.h"
#include "core/host_port.h"
#include "http/json_fields.h"

namespace weft {

boost::json::object Resource::to_json() const {
  return {{"id", id},
          {"name", name},
          {"mesh_ip", mesh_ip},
          {"mesh_port", mesh_port},
          {"target_host", target_host},
          {"target_port", target_port},
          {"protocol", protocol},
          {"agent_id", agent_id},
          {"enabled", enabled}};
}

Result<Resource> decode_resource(std::string_view body, FieldError& error) {
  auto f = JsonFields::parse(body, {"id", "name", "mesh_ip", "mesh_port", "target_host",
                                    "target_port", "protocol", "agent_id", "enabled"});
  if (!f) {
    error = {"", f.error()};
    return make_error(f.error());
  }
  Resource r;
  const auto fail = [&](const std::string& field, const std::string& msg) {
    error = {field, msg};
    return make_error(msg);
  };
  for (auto [name, out] : {std::pair<const char*, std::string*>{"id", &r.id},
                           {"name", &r.name},
                           {"mesh_ip", &r.mesh_ip},
                           {"target_host", &r.target_host},
                           {"protocol", &r.protocol},
                           {"agent_id", &r.agent_id}}) {
    auto v = f->string(name);
    if (!v) return fail(name, v.error());
    if (*v) *out = **v;
  }
  for (auto [name, out] : {std::pair<const char*, uint16_t*>{"mesh_port", &r.mesh_port},
                           {"target_port", &r.target_port}}) {
    auto v = f->integer(name);
    if (!v) return fail(name, v.error());
    if (!*v) return fail(name, std::string(name) + " is required (1-65535)");
    if (**v < 1 || **v > 65535) return fail(name, std::string(name) + " must be from 1 to 65535");
    *out = static_cast<uint16_t>(**v);
  }
  auto enabled = f->boolean("enabled");
  if (!enabled) return fail("enabled", enabled.error());
  r.enabled = enabled->value_or(true);
  if (r.target_host.empty()) return fail("target_host", "target_host is required");
  if (auto hp = parse_host_port(r.target_host + ":1");
      !hp || r.target_host.find(':') != std::string::npos)
    return fail("target_host",
                "target_host '" + r.target_host + "' is not a valid host name or IPv4 address");
  if (r.protocol != "tcp" && r.protocol != "http" && r.protocol != "https")
    return fail("protocol", "protocol must be tcp, http or https");
  if (r.id.empty()) r.id = "res-" + random_hex(6);
  for (char c : r.id)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return fail("id", "id may only hold letters, digits, '-', '_' and '.'");
  if (r.name.empty()) r.name = r.id;
  return r;
}

Result<Resource> parse_proxy_rule(std::string_view rule) {
  const auto colon = rule.find(':');
  if (colon == std::string_view::npos)
    return make_error("proxy rule '" + std::string(rule) +
                      "': expected local_port:host:port, like 8888:echo-server:80");
  auto target = parse_host_port(rule.substr(colon + 1));
  if (!target) return make_error("proxy rule '" + std::string(rule) + "': " + target.error());
  auto local = parse_host_port("127.0.0.1:" + std::string(rule.substr(0, colon)));
  if (!local)
    return make_error("proxy rule '" + std::string(rule) + "': local port must be from 1 to 65535");
  Resource r;
  r.id = "proxy-" + std::to_string(local->port);
  r.name = r.id;
  r.mesh_port = local->port;
  r.target_host = target->host;
  r.target_port = target->port;
  return r;
}

}  // namespace weft
