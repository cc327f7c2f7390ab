#include "cli/operator_commands.h"

#include <boost/json.hpp>
#include <cstdio>
#include <iostream>
#include <stdexcept>

#include "core/host_port.h"
#include "http/http_client.h"

namespace weft {

namespace json = boost::json;

namespace {

json::value call_json(HttpCall call) {
  auto r = http_call(call);
  if (!r) throw std::runtime_error(r.error());
  boost::system::error_code ec;
  auto v = json::parse(r->body, ec);
  if (r->status >= 400) {
    const std::string why = !ec && v.is_object() && v.as_object().contains("error")
                                ? std::string(v.at("error").as_string())
                                : r->body;
    throw std::runtime_error(call.method + " " + call.url + ": " + std::to_string(r->status) +
                             ": " + why);
  }
  if (ec) throw std::runtime_error(call.url + " answered something that is not JSON");
  return v;
}

std::string str(const json::value& v, const char* key) {
  auto* p = v.as_object().if_contains(key);
  if (!p || p->is_null()) return "-";
  if (p->is_string()) return std::string(p->as_string());
  return json::serialize(*p);
}

}  // namespace

int cmd_status(const ControlTarget& control, bool json_output) {
  if (control.url.empty()) throw std::runtime_error("--control (or MESH_CONTROL_URL) is required");
  HttpCall call;
  call.url = control.url + "/v1/agents";
  call.bearer = control.token;
  call.ca_file = control.ca_file;
  auto v = call_json(call);
  if (json_output) {
    std::cout << json::serialize(v) << "\n";
    return 0;
  }
  std::printf("%-18s %-16s %-10s %-14s %-18s %-8s\n", "AGENT", "NAME", "CLUSTER", "MESH IP",
              "BLOCK", "HEALTH");
  for (const auto& a : v.at("agents").as_array())
    std::printf("%-18s %-16s %-10s %-14s %-18s %-8s\n", str(a, "id").c_str(),
                str(a, "name").c_str(), str(a, "cluster").c_str(), str(a, "mesh_ip").c_str(),
                str(a, "mesh_block").c_str(), a.at("healthy").as_bool() ? "healthy" : "UNHEALTHY");
  return 0;
}

int cmd_keys_create(const ControlTarget& control, const std::string& ttl, bool reusable,
                    const std::string& cluster, bool json_output) {
  if (control.url.empty()) throw std::runtime_error("--control (or MESH_CONTROL_URL) is required");
  HttpCall call;
  call.url = control.url + "/v1/keys";
  call.method = "POST";
  call.bearer = control.token;
  call.ca_file = control.ca_file;
  call.body =
      json::serialize(json::object{{"ttl", ttl}, {"reusable", reusable}, {"cluster", cluster}});
  auto v = call_json(call);
  if (json_output) {
    std::cout << json::serialize(v) << "\n";
  } else {
    std::cout << str(v, "key") << "\n";
    std::cerr << "join key " << str(v, "id") << (reusable ? " (reusable)" : " (single use)")
              << "; it is shown only now\n";
  }
  return 0;
}

int cmd_resources_list(const AgentTarget& agent, bool json_output) {
  HttpCall call;
  call.url = agent.url + "/resources";
  auto v = call_json(call);
  if (json_output) {
    std::cout << json::serialize(v) << "\n";
    return 0;
  }
  std::printf("%-16s %-16s %-8s %-28s %-6s %-8s\n", "ID", "NAME", "PORT", "TARGET", "PROTO",
              "ENABLED");
  for (const auto& r : v.as_array())
    std::printf("%-16s %-16s %-8s %-28s %-6s %-8s\n", str(r, "id").c_str(), str(r, "name").c_str(),
                str(r, "mesh_port").c_str(),
                (str(r, "target_host") + ":" + str(r, "target_port")).c_str(),
                str(r, "protocol").c_str(), str(r, "enabled").c_str());
  return 0;
}

int cmd_resources_add(const AgentTarget& agent, const std::string& id, int port,
                      const std::string& target, const std::string& protocol, bool json_output) {
  auto hp = parse_host_port(target);
  if (!hp) throw std::runtime_error("--target: " + hp.error());
  json::object body{{"mesh_port", port},
                    {"target_host", hp->host},
                    {"target_port", hp->port},
                    {"protocol", protocol}};
  if (!id.empty()) body["id"] = id;
  HttpCall call;
  call.url = agent.url + "/resources/add";
  call.method = "POST";
  call.bearer = agent.token;
  call.body = json::serialize(body);
  auto v = call_json(call);
  if (json_output)
    std::cout << json::serialize(v) << "\n";
  else
    std::cout << "added " << str(v, "id") << ": port " << port << " -> " << target << "\n";
  return 0;
}

int cmd_resources_rm(const AgentTarget& agent, const std::string& id) {
  HttpCall call;
  call.url = agent.url + "/resources/" + id;
  call.method = "DELETE";
  call.bearer = agent.token;
  call_json(call);
  std::cout << "removed " << id << " (open connections drain)\n";
  return 0;
}

}  // namespace weft
