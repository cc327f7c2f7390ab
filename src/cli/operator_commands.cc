#include "cli/operator_commands.h"

#include <boost/json.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
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

json::value get(const ControlTarget& control, const std::string& path) {
  if (control.url.empty()) throw std::runtime_error("--control (or MESH_CONTROL_URL) is required");
  HttpCall call;
  call.url = control.url + path;
  call.bearer = control.token;
  call.ca_file = control.ca_file;
  return call_json(call);
}

// "in 23h59m", "EXPIRED 5m ago": what an operator needs to judge a certificate at a glance.
std::string expiry(const json::value& agent) {
  auto* p = agent.as_object().if_contains("cert_expires_ms");
  if (!p || !p->is_int64()) return "-";
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  int64_t left = (p->as_int64() - now) / 1000;
  const bool expired = left < 0;
  if (expired) left = -left;
  char buf[48];
  std::snprintf(buf, sizeof buf, "%s%lldh%02lldm%s", expired ? "EXPIRED " : "in ",
                static_cast<long long>(left / 3600), static_cast<long long>(left / 60 % 60),
                expired ? " ago" : "");
  return buf;
}

// Services with their endpoints; a resource is a service of its own name.
json::array service_table(const ControlTarget& control, const json::value& agents) {
  std::map<std::string, bool> healthy;
  for (const auto& a : agents.at("agents").as_array())
    healthy[str(a, "id")] = a.at("healthy").as_bool();
  std::map<std::string, json::object> out;
  // Named: a range-for over a temporary's member would outlive the temporary.
  const auto services = get(control, "/v1/services");
  const auto endpoints = get(control, "/v1/endpoints");
  const auto resources = get(control, "/v1/resources");
  for (const auto& s : services.at("services").as_array())
    out[str(s, "name")] = json::object{{"name", s.at("name")},
                                       {"port", s.at("port")},
                                       {"protocol", s.at("protocol")},
                                       {"endpoints", json::array{}}};
  const auto add = [&](const std::string& service, json::object ep) {
    auto& s = out[service];
    if (s.empty())
      s = {{"name", service},
           {"port", ep["port"]},
           {"protocol", ep["protocol"]},
           {"endpoints", json::array{}}};
    ep["healthy"] = healthy[std::string(ep["agent_id"].as_string())];
    s["endpoints"].as_array().push_back(std::move(ep));
  };
  for (const auto& e : endpoints.at("endpoints").as_array())
    add(str(e, "service"), {{"agent_id", e.at("agent_id")},
                            {"cluster", e.at("cluster")},
                            {"address", str(e, "address") + ":" + str(e, "port")},
                            {"port", e.at("port")},
                            {"protocol", e.at("protocol")}});
  for (const auto& r : resources.at("resources").as_array())
    add(str(r, "name"), {{"agent_id", r.at("agent_id")},
                         {"cluster", "-"},
                         {"address", str(r, "mesh_ip") + ":" + str(r, "mesh_port")},
                         {"port", r.at("mesh_port")},
                         {"protocol", r.at("protocol")}});
  json::array list;
  for (auto& [name, s] : out) list.push_back(std::move(s));
  return list;
}

void print_services(const json::array& services) {
  std::printf("%-20s %-6s %-6s %-10s %s\n", "SERVICE", "PORT", "PROTO", "HEALTHY", "ENDPOINTS");
  for (const auto& s : services) {
    const auto& eps = s.at("endpoints").as_array();
    size_t up = 0;
    std::string where;
    for (const auto& e : eps) {
      up += e.at("healthy").as_bool();
      where += (where.empty() ? "" : ", ") + str(e, "address") +
               (e.at("healthy").as_bool() ? "" : " (down)");
    }
    std::printf("%-20s %-6s %-6s %-10s %s\n", str(s, "name").c_str(), str(s, "port").c_str(),
                str(s, "protocol").c_str(),
                (std::to_string(up) + "/" + std::to_string(eps.size())).c_str(),
                where.empty() ? "-" : where.c_str());
  }
}

}  // namespace

int cmd_status(const ControlTarget& control, bool json_output) {
  auto v = get(control, "/v1/agents");
  auto services = service_table(control, v);
  if (json_output) {
    std::cout << json::serialize(json::object{{"agents", v.at("agents")}, {"services", services}})
              << "\n";
    return 0;
  }
  std::printf("%-18s %-16s %-10s %-14s %-18s %-10s %-22s %-22s %s\n", "AGENT", "NAME", "CLUSTER",
              "MESH IP", "BLOCK", "HEALTH", "REFLEXIVE", "NAT MAPPING", "CERT EXPIRES");
  for (const auto& a : v.at("agents").as_array()) {
    // The reflexive address comes first among the candidates (from STUN).
    std::string reflexive = "-";
    if (const auto* c = a.as_object().if_contains("candidates");
        c && c->is_array() && !c->as_array().empty() && c->as_array().at(0).is_string())
      reflexive = std::string(c->as_array().at(0).as_string());
    const std::string nat = str(a, "nat_mapping");
    std::printf("%-18s %-16s %-10s %-14s %-18s %-10s %-22s %-22s %s\n", str(a, "id").c_str(),
                str(a, "name").c_str(), str(a, "cluster").c_str(), str(a, "mesh_ip").c_str(),
                str(a, "mesh_block").c_str(), a.at("healthy").as_bool() ? "healthy" : "UNHEALTHY",
                reflexive.c_str(), nat.c_str(), expiry(a).c_str());
  }
  std::printf("\n");
  print_services(services);
  return 0;
}

int cmd_services(const ControlTarget& control, bool json_output) {
  auto services = service_table(control, get(control, "/v1/agents"));
  if (json_output)
    std::cout << json::serialize(json::object{{"services", services}}) << "\n";
  else
    print_services(services);
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
