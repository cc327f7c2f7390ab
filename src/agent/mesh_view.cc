#include "agent/mesh_view.h"

#include <boost/json.hpp>
#include <fstream>
#include <set>
#include <sstream>

#include "identity/certificate_authority.h"

namespace weft {

namespace json = boost::json;

namespace {

std::string text(const json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

int64_t number(const json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  return v && v->is_int64() ? v->as_int64() : 0;
}

}  // namespace

Result<bool> MeshView::apply(const json::object& delta) {
  auto* rev = delta.if_contains("revision");
  auto* full = delta.if_contains("full");
  auto* put = delta.if_contains("put");
  auto* deleted = delta.if_contains("deleted");
  if (!rev || !rev->is_int64() || !full || !full->is_bool() || !put || !put->is_array() ||
      !deleted || !deleted->is_array())
    return make_error("watch answer lacks revision, full, put or deleted");
  std::map<std::string, json::object> next = full->as_bool() ? decltype(objects_){} : objects_;
  for (const auto& item : put->as_array()) {
    if (!item.is_object() || !item.as_object().contains("value") || !item.at("value").is_object())
      return make_error("watch answer has a malformed put");
    next[text(item.as_object(), "kind") + "/" + text(item.as_object(), "name")] =
        item.at("value").as_object();
  }
  for (const auto& item : deleted->as_array()) {
    if (!item.is_object()) return make_error("watch answer has a malformed delete");
    next.erase(text(item.as_object(), "kind") + "/" + text(item.as_object(), "name"));
  }
  objects_ = std::move(next);
  revision_ = rev->as_int64();
  return true;
}

const json::object* MeshView::get(const std::string& kind, const std::string& name) const {
  auto it = objects_.find(kind + "/" + name);
  return it == objects_.end() ? nullptr : &it->second;
}

// The service's declared port when the registry has one, else the endpoint's own: both sides
// of a tunnel compute the same authority from the same objects.
std::string MeshView::authority_of(const std::string& service, int64_t own_port) const {
  const auto* s = get("services", service);
  return service + ":" + std::to_string(s ? number(*s, "port") : own_port);
}

std::vector<MeshImport> MeshView::imports(const std::string& self) const {
  std::map<std::string, MeshImport> by_service;
  std::set<std::string> local;
  for (const auto& [key, v] : objects_) {
    const bool endpoint = key.rfind("endpoints/", 0) == 0;
    if (!endpoint && key.rfind("resources/", 0) != 0) continue;
    const std::string service = text(v, endpoint ? "service" : "name");
    const std::string agent = text(v, "agent_id");
    if (agent == self) {
      local.insert(service);  // hosted here: served by this agent directly
      continue;
    }
    if (!endpoint && v.if_contains("enabled") && v.at("enabled") == json::value(false)) continue;
    const int64_t port = number(v, endpoint ? "port" : "mesh_port");
    auto& imp = by_service[service];
    if (imp.service.empty()) {
      imp.service = service;
      imp.authority = authority_of(service, port);
      const auto* s = get("services", service);
      imp.port = static_cast<uint16_t>(s ? number(*s, "port") : port);
    }
    const auto* host = get("agents", agent);
    // Unhealthy agents are out of routing; agents that have not said where they serve yet
    // cannot be reached.
    auto* healthy = host ? host->if_contains("healthy") : nullptr;
    if (!healthy || !healthy->is_bool() || !healthy->as_bool()) continue;
    auto hbone = parse_host_port(text(*host, "hbone"));
    if (!hbone) continue;
    imp.peers.push_back(*hbone);
    imp.peer_ids.push_back(text(*host, "spiffe_id"));
    imp.peer_agents.push_back(agent);
  }
  std::vector<MeshImport> out;
  for (auto& [service, imp] : by_service)
    if (!local.count(service) && !imp.peers.empty()) out.push_back(std::move(imp));
  return out;
}

std::vector<MeshAgent> MeshView::agents() const {
  std::vector<MeshAgent> out;
  for (const auto& [key, v] : objects_) {
    if (key.rfind("agents/", 0) != 0) continue;
    MeshAgent a;
    a.id = text(v, "id");
    a.name = text(v, "name");
    a.cluster = text(v, "cluster");
    a.spiffe_id = text(v, "spiffe_id");
    a.hbone = text(v, "hbone");
    a.node_key = text(v, "node_key");
    if (auto* c = v.if_contains("candidates"); c && c->is_array())
      for (const auto& x : c->as_array())
        if (x.is_string()) a.candidates.emplace_back(x.as_string());
    if (auto* p = v.if_contains("p2p"); p && p->is_bool()) a.p2p = p->as_bool();
    out.push_back(std::move(a));
  }
  return out;
}

std::vector<MeshExport> MeshView::exports(const std::string& self) const {
  std::vector<MeshExport> out;
  for (const auto& [key, v] : objects_) {
    const bool endpoint = key.rfind("endpoints/", 0) == 0;
    if ((!endpoint && key.rfind("resources/", 0) != 0) || text(v, "agent_id") != self) continue;
    if (!endpoint && v.if_contains("enabled") && v.at("enabled") == json::value(false)) continue;
    MeshExport e;
    e.service = text(v, endpoint ? "service" : "name");
    const int64_t port = number(v, endpoint ? "port" : "mesh_port");
    e.authority = authority_of(e.service, port);
    auto target = endpoint ? parse_host_port(text(v, "target"))
                           : parse_host_port(text(v, "target_host") + ":" +
                                             std::to_string(number(v, "target_port")));
    if (!target) continue;
    e.target = *target;
    const auto* s = get("services", e.service);
    const int64_t service_port = s ? number(*s, "port") : port;
    for (const auto& [pkey, p] : objects_) {
      if (pkey.rfind("policies/", 0) != 0 || text(p, "service") != e.service) continue;
      if (number(p, "port") != 0 && number(p, "port") != service_port) continue;
      if (auto* allow = p.if_contains("allow"); allow && allow->is_array())
        for (const auto& id : allow->as_array())
          if (id.is_string()) e.allow.emplace_back(id.as_string());
    }
    if (!e.allow.empty()) out.push_back(std::move(e));
  }
  return out;
}

void MeshView::save(const std::filesystem::path& file) const {
  json::object items;
  for (const auto& [key, v] : objects_) items[key] = v;
  write_file_atomic(
      file, json::serialize(json::object{{"revision", revision_}, {"objects", items}}) + "\n",
      0600);
}

MeshView MeshView::load(const std::filesystem::path& file) {
  MeshView view;
  std::ifstream in(file);
  if (!in) return view;
  std::stringstream ss;
  ss << in.rdbuf();
  boost::system::error_code ec;
  auto v = json::parse(ss.str(), ec);
  if (ec || !v.is_object() || !v.as_object().contains("objects")) return view;
  for (const auto& [key, value] : v.at("objects").as_object())
    if (value.is_object()) view.objects_[std::string(key)] = value.as_object();
  view.revision_ = number(v.as_object(), "revision");
  return view;
}

}  // namespace weft
