#include "control/registry.h"

#include <algorithm>
#include <boost/json.hpp>

#include "agent/resource.h"
#include "control/join_keys.h"
#include "core/host_port.h"
#include "core/label.h"
#include "http/json_fields.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace json = boost::json;

namespace {

std::string text(const json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

json::object parse_object(const std::string& body) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  return !ec && v.is_object() ? v.as_object() : json::object{};
}

json::object item(const std::string& kind, const std::string& name, int64_t rev,
                  const json::object& value) {
  return {{"kind", kind}, {"name", name}, {"rev", rev}, {"value", value}};
}

}  // namespace

json::object WatchDelta::to_json() const {
  return {{"revision", revision}, {"full", full}, {"put", put}, {"deleted", deleted}};
}

Result<json::object> Registry::validate(const std::string& kind, const std::string& url_name,
                                        std::string_view body, RegistryError& error) const {
  const auto fail = [&](int status, const std::string& field, const std::string& msg) {
    error = {status, field, msg};
    return make_error(msg);
  };
  if (kind == "resources") {
    FieldError fe;
    auto r = decode_resource(body, fe);
    if (!r) return fail(400, fe.field, fe.message);
    if (!url_name.empty()) {
      if (body.find("\"id\"") != std::string_view::npos && r->id != url_name)
        return fail(400, "id", "id in the body (" + r->id + ") does not match the URL");
      r->id = url_name;
      if (r->name.rfind("res-", 0) == 0) r->name = url_name;
    }
    if (r->agent_id.empty()) return fail(400, "agent_id", "agent_id is required");
    const auto agent = get("agents", r->agent_id);
    if (!agent) return fail(400, "agent_id", "no agent " + r->agent_id);
    if (r->mesh_ip.empty()) r->mesh_ip = text(*agent, "mesh_ip");
    return r->to_json();
  }

  std::string bad;
  const auto parse = [&]() -> Result<JsonFields> {
    if (kind == "clusters") return JsonFields::parse(body, {"name", "description"}, &bad);
    if (kind == "services")
      return JsonFields::parse(body, {"name", "port", "protocol", "namespace"}, &bad);
    if (kind == "endpoints")
      return JsonFields::parse(body,
                               {"name", "service", "agent_id", "address", "port", "namespace",
                                "service_account", "target", "protocol"},
                               &bad);
    return JsonFields::parse(body, {"name", "service", "port", "allow"}, &bad);
  };
  if (kind != "clusters" && kind != "services" && kind != "endpoints" && kind != "policies")
    return fail(404, "", "no registry kind '" + kind + "'");
  auto f = parse();
  if (!f) return fail(400, bad, f.error());
  json::object out;
  // Strings, with defaults; "" default means optional and left out.
  const auto str = [&](const char* field, const std::string& def, std::string& value) -> bool {
    auto v = f->string(field);
    if (!v) {
      error = {400, field, v.error()};
      return false;
    }
    value = v->value_or(def);
    return true;
  };
  const auto port = [&](const char* field, int64_t min, std::optional<int64_t> def,
                        int64_t& value) -> bool {
    auto v = f->integer(field);
    if (!v) {
      error = {400, field, v.error()};
      return false;
    }
    if (!*v && !def) {
      error = {400, field, std::string(field) + " is required (1-65535)"};
      return false;
    }
    value = v->value_or(def.value_or(0));
    if (value < min || value > 65535) {
      error = {400, field,
               std::string(field) + " must be from " + std::to_string(min) + " to 65535"};
      return false;
    }
    return true;
  };

  std::string name;
  if (!str("name", url_name, name)) return make_error(error.message);
  if (!url_name.empty() && name != url_name)
    return fail(400, "name", "name in the body (" + name + ") does not match the URL");
  if (name.empty() && kind == "endpoints") name = "ep-" + random_hex(6);
  if (!is_valid_label(name)) return fail(400, "name", "name must be 1-63 of [a-z0-9-._]");
  out["name"] = name;

  if (kind == "clusters") {
    std::string description;
    if (!str("description", "", description)) return make_error(error.message);
    out["description"] = description;
    return out;
  }
  if (kind == "services") {
    int64_t p = 0;
    std::string protocol, ns;
    if (!port("port", 1, std::nullopt, p) || !str("protocol", "tcp", protocol) ||
        !str("namespace", "default", ns))
      return make_error(error.message);
    if (protocol != "tcp" && protocol != "http" && protocol != "http2" && protocol != "grpc")
      return fail(400, "protocol", "protocol must be tcp, http, http2 or grpc");
    if (!is_valid_label(ns)) return fail(400, "namespace", "namespace must be 1-63 of [a-z0-9-._]");
    out["port"] = p;
    out["protocol"] = protocol;
    out["namespace"] = ns;
    return out;
  }
  if (kind == "endpoints") {
    std::string service, agent_id, address, ns, sa, target, protocol;
    int64_t p = 0;
    if (!str("service", "", service) || !str("agent_id", "", agent_id) ||
        !str("address", "", address) || !port("port", 1, std::nullopt, p) ||
        !str("namespace", "default", ns) || !str("service_account", "default", sa) ||
        !str("target", "", target) || !str("protocol", "tcp", protocol))
      return make_error(error.message);
    if (!is_valid_label(service))
      return fail(400, "service", "service must be 1-63 of [a-z0-9-._]");
    if (agent_id.empty()) return fail(400, "agent_id", "agent_id is required");
    const auto agent = get("agents", agent_id);
    if (!agent) return fail(400, "agent_id", "no agent " + agent_id);
    if (address.empty()) address = text(*agent, "mesh_ip");
    if (!parse_host_port(address + ":1") || address.find(':') != std::string::npos)
      return fail(400, "address", "address '" + address + "' is not a host name or IPv4 address");
    if (target.empty()) target = "127.0.0.1:" + std::to_string(p);
    if (auto hp = parse_host_port(target); !hp) return fail(400, "target", "target: " + hp.error());
    if (!is_valid_label(ns)) return fail(400, "namespace", "namespace must be 1-63 of [a-z0-9-._]");
    if (!is_valid_label(sa))
      return fail(400, "service_account", "service_account must be 1-63 of [a-z0-9-._]");
    if (protocol != "tcp" && protocol != "http" && protocol != "http2" && protocol != "grpc")
      return fail(400, "protocol", "protocol must be tcp, http, http2 or grpc");
    out["service"] = service;
    out["agent_id"] = agent_id;
    out["cluster"] = text(*agent, "cluster");
    out["address"] = address;
    out["port"] = p;
    out["target"] = target;
    out["namespace"] = ns;
    out["service_account"] = sa;
    out["protocol"] = protocol;
    return out;
  }
  // policies
  std::string service;
  int64_t p = 0;
  if (!str("service", "", service) || !port("port", 0, 0, p)) return make_error(error.message);
  if (!is_valid_label(service)) return fail(400, "service", "service must be 1-63 of [a-z0-9-._]");
  auto allow = f->strings("allow");
  if (!allow) return fail(400, "allow", allow.error());
  if (!*allow || (*allow)->empty())
    return fail(400, "allow",
                "allow is required: SPIFFE IDs, prefixes ending in /*, or \"*\" for any");
  json::array ids;
  for (const auto& id : **allow) {
    if (auto ok = check_identity_pattern(id); !ok)
      return fail(400, "allow",
                  ok.error() + " (allow takes SPIFFE IDs, prefixes ending in /*, or \"*\")");
    ids.push_back(json::value(id));
  }
  out["service"] = service;
  out["port"] = p;
  out["allow"] = ids;
  return out;
}

void Registry::index(const std::string& kind, const std::string& name, const json::object& v,
                     int delta) {
  const auto update = [&](std::set<std::string>& set) {
    if (delta > 0)
      set.insert(name);
    else
      set.erase(name);
  };
  const auto count = [&](std::map<std::string, int>& m, const std::string& key) {
    if ((m[key] += delta) <= 0) m.erase(key);
  };
  if (kind == "endpoints") {
    update(endpoints_of_[text(v, "service")]);
    count(services_on_agent_[text(v, "agent_id")], text(v, "service"));
    count(identities_on_agent_[text(v, "agent_id")],
          text(v, "namespace") + "/" + text(v, "service_account"));
  } else if (kind == "resources") {
    update(resources_of_[text(v, "name")]);
    count(services_on_agent_[text(v, "agent_id")], text(v, "name"));
  } else if (kind == "policies") {
    update(policies_of_[text(v, "service")]);
  }
}

void Registry::load(const std::vector<StoredObject>& objects, const std::vector<StoredChange>& log,
                    int64_t revision) {
  for (const auto& o : objects) {
    auto v = parse_object(o.body);
    index(o.kind, o.name, v, +1);
    objects_[o.kind][o.name] = {o.body, o.rev, keys_of(o.kind, v)};
  }
  for (const auto& c : log) {
    LogEntry e{c.rev, c.kind, c.name, std::nullopt, std::nullopt};
    if (!c.body.empty()) e.value = keys_of(c.kind, parse_object(c.body));
    if (!c.prev.empty()) e.prev = keys_of(c.kind, parse_object(c.prev));
    log_.push_back(std::move(e));
  }
  while (log_.size() > log_retention) log_.pop_front();
  revision_ = revision;
  log_floor_ = log_.empty() ? revision : log_.front().rev - 1;
}

void Registry::apply(int64_t rev, const std::string& kind, const std::string& name,
                     const std::string& body, const std::string& prev) {
  auto& table = objects_[kind];
  if (auto it = table.find(name); it != table.end()) {
    index(kind, name, parse_object(it->second.body), -1);
    table.erase(it);
  }
  LogEntry e{rev, kind, name, std::nullopt, std::nullopt};
  if (!body.empty()) {
    auto v = parse_object(body);
    index(kind, name, v, +1);
    auto keys = keys_of(kind, v);
    e.value = keys;
    table[name] = {body, rev, std::move(keys)};
  }
  if (!prev.empty()) e.prev = keys_of(kind, parse_object(prev));
  log_.push_back(std::move(e));
  while (log_.size() > log_retention) {
    log_floor_ = log_.front().rev;
    log_.pop_front();
  }
  revision_ = rev;
}

const std::string* Registry::body(const std::string& kind, const std::string& name) const {
  auto t = objects_.find(kind);
  if (t == objects_.end()) return nullptr;
  auto it = t->second.find(name);
  return it == t->second.end() ? nullptr : &it->second.body;
}

std::optional<json::object> Registry::get(const std::string& kind, const std::string& name) const {
  const std::string* b = body(kind, name);
  if (!b) return std::nullopt;
  return parse_object(*b);
}

bool Registry::contains(const std::string& kind, const std::string& name) const {
  return body(kind, name) != nullptr;
}

std::vector<json::object> Registry::list(const std::string& kind) const {
  std::vector<json::object> out;
  if (auto t = objects_.find(kind); t != objects_.end())
    for (const auto& [name, e] : t->second) out.push_back(parse_object(e.body));
  return out;
}

Registry::Keys Registry::keys_of(const std::string& kind, const json::object& v) {
  Keys k;
  k.agent_id = text(v, "agent_id");
  k.service = text(v, "service");
  if (kind == "resources") k.resource_name = text(v, "name");
  if (kind == "agents") k.spiffe_id = text(v, "spiffe_id");
  if (kind == "policies")
    if (const auto* allow = v.if_contains("allow"); allow && allow->is_array())
      for (const auto& pattern : allow->as_array())
        if (pattern.is_string()) k.allow.emplace_back(pattern.as_string());
  return k;
}

const Registry::Entry* Registry::entry(const std::string& kind, const std::string& name) const {
  auto t = objects_.find(kind);
  if (t == objects_.end()) return nullptr;
  auto it = t->second.find(name);
  return it == t->second.end() ? nullptr : &it->second;
}

bool Registry::hosts_identity(const std::string& agent_id, const std::string& ns,
                              const std::string& sa) const {
  auto it = identities_on_agent_.find(agent_id);
  return it != identities_on_agent_.end() && it->second.count(ns + "/" + sa);
}

std::vector<std::string> Registry::identities_of(const std::string& agent_id) const {
  std::vector<std::string> ids;
  if (const auto* a = entry("agents", agent_id)) ids.push_back(a->keys.spiffe_id);
  if (auto it = identities_on_agent_.find(agent_id); it != identities_on_agent_.end())
    for (const auto& [ns_sa, n] : it->second) {
      const auto slash = ns_sa.find('/');
      ids.push_back("spiffe://" + trust_domain_ + "/ns/" + ns_sa.substr(0, slash) + "/sa/" +
                    ns_sa.substr(slash + 1));
    }
  return ids;
}

Registry::Scope Registry::scope_of(const std::string& agent_id) const {
  Scope s;
  const auto ids = identities_of(agent_id);
  for (const auto& [service, names] : policies_of_) {
    bool allowed = false;
    for (const auto& p : names) {
      const auto* policy = entry("policies", p);
      if (!policy) continue;
      for (const auto& pattern : policy->keys.allow)
        for (const auto& id : ids) allowed = allowed || spiffe_pattern_matches(pattern, id);
      if (allowed) break;
    }
    if (allowed) s.reach.insert(service);
  }
  if (auto it = services_on_agent_.find(agent_id); it != services_on_agent_.end())
    for (const auto& [service, n] : it->second) s.hosted.insert(service);
  return s;
}

bool Registry::in_scope(const std::string& agent_id, const Scope& s, const std::string& kind,
                        const std::string& name, const Keys& k) const {
  if (kind == "services") return s.reach.count(name) || s.hosted.count(name);
  if (kind == "endpoints") return k.agent_id == agent_id || s.reach.count(k.service);
  if (kind == "resources") return k.agent_id == agent_id || s.reach.count(k.resource_name);
  if (kind == "policies") return s.hosted.count(k.service) > 0;
  if (kind == "agents") {
    if (name == agent_id) return true;
    auto it = services_on_agent_.find(name);
    if (it == services_on_agent_.end()) return false;
    for (const auto& [service, n] : it->second)
      if (s.reach.count(service)) return true;
    return false;
  }
  return false;  // clusters and anything else are operator-only
}

WatchDelta Registry::full_view(const std::string& agent_id) const {
  WatchDelta d;
  d.revision = revision_;
  d.full = true;
  const Scope s = scope_of(agent_id);
  std::set<std::pair<std::string, std::string>> seen;
  const auto add = [&](const std::string& kind, const std::string& name) {
    if (!seen.insert({kind, name}).second) return;
    const Entry* e = entry(kind, name);
    if (!e || !in_scope(agent_id, s, kind, name, e->keys)) return;
    d.put.push_back(item(kind, name, e->rev, parse_object(e->body)));
  };
  add("agents", agent_id);
  std::set<std::string> services = s.reach;
  services.insert(s.hosted.begin(), s.hosted.end());
  for (const auto& service : services) {
    add("services", service);
    for (const auto& [kind, index] :
         {std::pair<const char*, const decltype(endpoints_of_)*>{"endpoints", &endpoints_of_},
          {"resources", &resources_of_}}) {
      auto it = index->find(service);
      if (it == index->end()) continue;
      for (const auto& name : it->second) {
        add(kind, name);
        if (const auto* e = entry(kind, name)) add("agents", e->keys.agent_id);
      }
    }
    if (auto it = policies_of_.find(service); it != policies_of_.end())
      for (const auto& name : it->second) add("policies", name);
  }
  return d;
}

WatchDelta Registry::delta(const std::string& agent_id, int64_t since) const {
  if (since < log_floor_ || since > revision_) return full_view(agent_id);
  WatchDelta d;
  d.revision = revision_;
  if (since == revision_) return d;
  const Scope s = scope_of(agent_id);
  auto first = std::upper_bound(log_.begin(), log_.end(), since,
                                [](int64_t r, const LogEntry& e) { return r < e.rev; });
  // Last change per object wins; order of first appearance is kept for readability.
  std::map<std::pair<std::string, std::string>, bool> latest;  // true: put, false: deleted
  std::vector<std::pair<std::string, std::string>> order;
  for (auto it = first; it != log_.end(); ++it) {
    const LogEntry& e = *it;
    // A policy change can move services in or out of reach, and a change to what this agent
    // hosts changes its identities: both redraw its scope, so it gets its whole view again.
    if (e.kind == "policies") return full_view(agent_id);
    if (e.kind == "endpoints" || e.kind == "resources") {
      if ((e.value && e.value->agent_id == agent_id) || (e.prev && e.prev->agent_id == agent_id))
        return full_view(agent_id);
    }
    const bool now = e.value && in_scope(agent_id, s, e.kind, e.name, *e.value);
    const bool before = e.prev && in_scope(agent_id, s, e.kind, e.name, *e.prev);
    if (!now && !before) continue;
    const auto key = std::make_pair(e.kind, e.name);
    if (!latest.count(key)) order.push_back(key);
    latest[key] = now;
  }
  for (const auto& key : order) {
    // The log is complete up to revision_, so an object whose last change was a put is the
    // current object.
    const Entry* current = latest[key] ? entry(key.first, key.second) : nullptr;
    if (current) {
      d.put.push_back(item(key.first, key.second, current->rev, parse_object(current->body)));
    } else {
      d.deleted.push_back(json::object{{"kind", key.first}, {"name", key.second}});
    }
  }
  return d;
}

}  // namespace weft
