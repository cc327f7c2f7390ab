#include "config/proxy_config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>
#include <sstream>

#include <boost/json.hpp>

#include "core/label.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace fs = std::filesystem;

namespace {

// Walks the YAML tree remembering where each node came from, so every error can say
// "file:line:column: field 'a.b[2].c': what is wrong; what to write".
class Reader {
 public:
  Reader(std::string source, fs::path base) : source_(std::move(source)), base_(std::move(base)) {}

  [[noreturn]] void fail(const YAML::Node& node, const std::string& field,
                         const std::string& what) const {
    std::ostringstream out;
    out << source_;
    if (node.IsDefined() && node.Mark().line >= 0)
      out << ":" << node.Mark().line + 1 << ":" << node.Mark().column + 1;
    out << ": field '" << field << "': " << what;
    throw ConfigError(out.str());
  }

  void require_map(const YAML::Node& node, const std::string& field,
                   std::initializer_list<std::string_view> allowed) const {
    if (!node.IsMap()) fail(node, field, "expected a mapping (key: value lines)");
    for (const auto& kv : node) {
      if (!kv.first.IsScalar()) fail(kv.first, field, "keys must be plain names");
      const std::string key = kv.first.Scalar();
      bool known = false;
      for (auto a : allowed) known = known || a == key;
      if (!known) {
        std::string list;
        for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
        fail(kv.first, join(field, key), "unknown field; expected one of: " + list);
      }
    }
  }

  static std::string join(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }

  std::string scalar(const YAML::Node& node, const std::string& field) const {
    if (!node.IsScalar()) fail(node, field, "expected a single value");
    return node.Scalar();
  }

  std::string string_field(const YAML::Node& map, const std::string& parent, const char* key,
                           bool required, std::string fallback = {}) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) {
      if (required) fail(map, join(parent, key), "is required");
      return fallback;
    }
    return scalar(n, join(parent, key));
  }

  HostPort address(const YAML::Node& map, const std::string& parent, const char* key, bool required,
                   HostPort fallback = {}, bool allow_zero = false) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) {
      if (required) fail(map, join(parent, key), "is required (host:port)");
      return fallback;
    }
    auto hp = parse_host_port(scalar(n, join(parent, key)), allow_zero);
    if (!hp) fail(n, join(parent, key), hp.error());
    return *hp;
  }

  Millis duration(const YAML::Node& map, const std::string& parent, const char* key,
                  Millis fallback) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    auto d = parse_duration(scalar(n, join(parent, key)));
    if (!d) fail(n, join(parent, key), d.error());
    return *d;
  }

  unsigned number(const YAML::Node& map, const std::string& parent, const char* key,
                  unsigned fallback, unsigned lo, unsigned hi) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    const std::string s = scalar(n, join(parent, key));
    unsigned long v = 0;
    size_t used = 0;
    try {
      v = std::stoul(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != s.size() || s.empty() || s[0] == '-' || v < lo || v > hi)
      fail(n, join(parent, key),
           "expected a whole number from " + std::to_string(lo) + " to " + std::to_string(hi));
    return static_cast<unsigned>(v);
  }

  // Exact identities (what a server must present) or, with `patterns`, authorization patterns.
  std::vector<std::string> spiffe_list(const YAML::Node& map, const std::string& parent,
                                       const char* key, bool patterns = false) const {
    std::vector<std::string> out;
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return out;
    if (!n.IsSequence()) fail(n, join(parent, key), "expected a list of SPIFFE IDs");
    for (size_t i = 0; i < n.size(); ++i) {
      const std::string field = join(parent, key) + "[" + std::to_string(i) + "]";
      const std::string id = scalar(n[i], field);
      auto parsed = patterns ? check_identity_pattern(id) : check_mesh_identity(id);
      if (!parsed) fail(n[i], field, parsed.error());
      out.push_back(id);
    }
    return out;
  }

  const YAML::Node sequence(const YAML::Node& map, const char* key) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return YAML::Node(YAML::NodeType::Sequence);
    if (!n.IsSequence()) fail(n, key, "expected a list (lines starting with '- ')");
    return n;
  }

  fs::path path(const YAML::Node& map, const std::string& parent, const char* key) const {
    fs::path p = string_field(map, parent, key, true);
    return p.is_absolute() ? p : base_ / p;
  }

 private:
  std::string source_;
  fs::path base_;
};

void check_name(const Reader& r, const YAML::Node& node, const std::string& field,
                const std::string& name, std::set<std::string>& seen) {
  if (name.empty()) r.fail(node, field, "must not be empty");
  if (!seen.insert(name).second) r.fail(node, field, "duplicate name '" + name + "'");
}

void check_listen(const Reader& r, const YAML::Node& node, const std::string& field,
                  const HostPort& hp, std::set<std::string>& seen) {
  if (hp.port != 0 && !seen.insert(hp.to_string()).second)
    r.fail(node, field, hp.to_string() + " is already used by another listener");
}

}  // namespace

const ServiceConfig* ProxyConfig::find_service(std::string_view name) const {
  for (const auto& s : services)
    if (s.name == name) return &s;
  return nullptr;
}

const InboundTargetConfig* ProxyConfig::find_target(std::string_view authority) const {
  for (const auto& t : inbound.targets)
    if (t.authority == authority) return &t;
  return nullptr;
}

namespace {

ProxyConfig parse_checked(std::string_view yaml, const std::string& source, const fs::path& base) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    throw ConfigError(source + ":" + std::to_string(e.mark.line + 1) + ":" +
                      std::to_string(e.mark.column + 1) + ": not valid YAML: " + e.msg);
  }
  Reader r(source, base);
  if (root.IsNull()) throw ConfigError(source + ": the config is empty");
  r.require_map(
      root, "",
      {"identity", "workers", "admin", "drain_timeout", "cert_check_interval", "access_log",
       "services", "outbound", "inbound", "l4", "capture", "pool", "services_from_agent"});
  ProxyConfig c;
  c.source = source;
  if (auto n = root["services_from_agent"]; n.IsDefined()) {
    const std::string v = r.scalar(n, "services_from_agent");
    if (v != "true" && v != "false") r.fail(n, "services_from_agent", "expected true or false");
    c.services_from_agent = v == "true";
  }
  c.workers = r.number(root, "", "workers", 0, 0, 256);
  c.drain_timeout = r.duration(root, "", "drain_timeout", c.drain_timeout);
  c.cert_check_interval = r.duration(root, "", "cert_check_interval", c.cert_check_interval);
  c.access_log = r.string_field(root, "", "access_log", false, c.access_log);
  if (c.access_log != "stdout" && c.access_log != "off") {
    fs::path p = c.access_log;
    if (!p.is_absolute()) c.access_log = (base / p).string();
  }

  if (auto admin = root["admin"]; admin.IsDefined()) {
    r.require_map(admin, "admin", {"listen"});
    c.admin = r.address(admin, "admin", "listen", false, c.admin, true);
    if (c.admin.host != "127.0.0.1" && c.admin.host != "::1" && c.admin.host != "localhost")
      r.fail(admin["listen"], "admin.listen",
             "the admin interface may only bind a loopback address (127.0.0.1 or [::1])");
  }

  if (auto pool = root["pool"]; pool.IsDefined()) {
    r.require_map(pool, "pool", {"max_streams", "idle_timeout", "connect_timeout"});
    c.pool.max_streams = r.number(pool, "pool", "max_streams", c.pool.max_streams, 1, 100000);
    c.pool.idle_timeout = r.duration(pool, "pool", "idle_timeout", c.pool.idle_timeout);
    c.pool.connect_timeout = r.duration(pool, "pool", "connect_timeout", c.pool.connect_timeout);
  }

  std::set<std::string> service_names, listener_names, listens;
  const auto services = r.sequence(root, "services");
  for (size_t i = 0; i < services.size(); ++i) {
    const std::string f = "services[" + std::to_string(i) + "]";
    const YAML::Node n = services[i];
    r.require_map(n, f, {"name", "addresses", "authority", "spiffe_ids", "destinations"});
    ServiceConfig s;
    s.name = r.string_field(n, f, "name", true);
    check_name(r, n["name"], f + ".name", s.name, service_names);
    const YAML::Node addrs = n["addresses"];
    if (!addrs.IsDefined() || !addrs.IsSequence() || addrs.size() == 0)
      r.fail(addrs.IsDefined() ? addrs : n, f + ".addresses",
             "expected a non-empty list of peer proxy addresses (host:port of their HBONE port)");
    for (size_t j = 0; j < addrs.size(); ++j) {
      const std::string af = f + ".addresses[" + std::to_string(j) + "]";
      auto hp = parse_host_port(r.scalar(addrs[j], af));
      if (!hp) r.fail(addrs[j], af, hp.error());
      s.addresses.push_back(*hp);
    }
    s.authority = r.string_field(n, f, "authority", true);
    if (auto a = parse_host_port(s.authority); !a)
      r.fail(n["authority"], f + ".authority", a.error());
    s.spiffe_ids = r.spiffe_list(n, f, "spiffe_ids");
    if (s.spiffe_ids.empty())
      r.fail(n, f + ".spiffe_ids",
             "is required: list the SPIFFE IDs the peer proxy may present, e.g. "
             "[spiffe://cluster.local/ns/default/sa/echo]");
    const auto dests = r.sequence(n, "destinations");
    for (size_t j = 0; j < dests.size(); ++j) {
      const std::string df = f + ".destinations[" + std::to_string(j) + "]";
      auto hp = parse_host_port(r.scalar(dests[j], df));
      if (!hp) r.fail(dests[j], df, hp.error() + " (what applications dial, e.g. 10.96.0.10:80)");
      for (auto& ch : hp->host)
        ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      s.destinations.push_back(*hp);
    }
    c.services.push_back(std::move(s));
  }

  const auto outbound = r.sequence(root, "outbound");
  for (size_t i = 0; i < outbound.size(); ++i) {
    const std::string f = "outbound[" + std::to_string(i) + "]";
    const YAML::Node n = outbound[i];
    r.require_map(n, f, {"name", "listen", "service"});
    OutboundListenerConfig o;
    o.name = r.string_field(n, f, "name", true);
    check_name(r, n["name"], f + ".name", o.name, listener_names);
    o.listen = r.address(n, f, "listen", true, {}, true);
    check_listen(r, n["listen"], f + ".listen", o.listen, listens);
    o.service = r.string_field(n, f, "service", true);
    // With services from the agent, a name may only be known once the agent sends it.
    if (!c.find_service(o.service) && !c.services_from_agent)
      r.fail(n["service"], f + ".service",
             "no service named '" + o.service +
                 "'; define it under 'services:' (or set services_from_agent with an sds "
                 "identity)");
    c.outbound.push_back(std::move(o));
  }

  if (auto in = root["inbound"]; in.IsDefined()) {
    r.require_map(in, "inbound", {"listen", "targets"});
    c.inbound.enabled = true;
    c.inbound.listen = r.address(in, "inbound", "listen", false, c.inbound.listen, true);
    check_listen(r, in["listen"], "inbound.listen", c.inbound.listen, listens);
    const auto targets = r.sequence(in, "targets");
    std::set<std::string> authorities;
    for (size_t i = 0; i < targets.size(); ++i) {
      const std::string f = "inbound.targets[" + std::to_string(i) + "]";
      const YAML::Node n = targets[i];
      r.require_map(n, f, {"authority", "address", "allow", "deny"});
      InboundTargetConfig t;
      t.address = r.address(n, f, "address", true);
      t.authority = r.string_field(n, f, "authority", false, t.address.to_string());
      if (!authorities.insert(t.authority).second)
        r.fail(n, f + ".authority", "duplicate target '" + t.authority + "'");
      t.allow = r.spiffe_list(n, f, "allow", true);
      t.deny = r.spiffe_list(n, f, "deny", true);
      c.inbound.targets.push_back(std::move(t));
    }
  }

  const auto l4 = r.sequence(root, "l4");
  for (size_t i = 0; i < l4.size(); ++i) {
    const std::string f = "l4[" + std::to_string(i) + "]";
    const YAML::Node n = l4[i];
    r.require_map(n, f, {"name", "listen", "upstream"});
    L4ListenerConfig l;
    l.name = r.string_field(n, f, "name", true);
    check_name(r, n["name"], f + ".name", l.name, listener_names);
    l.listen = r.address(n, f, "listen", true, {}, true);
    check_listen(r, n["listen"], f + ".listen", l.listen, listens);
    l.upstream = r.address(n, f, "upstream", true);
    c.l4.push_back(std::move(l));
  }

  if (auto cap = root["capture"]; cap.IsDefined()) {
    r.require_map(cap, "capture",
                  {"transparent", "explicit", "inbound", "inbound_plaintext", "detect_timeout",
                   "opaque_ports", "egress", "users", "handshake_timeout"});
    auto& k = c.capture;
    if (cap["transparent"].IsDefined()) {
      k.transparent = r.address(cap, "capture", "transparent", true, {}, true);
      check_listen(r, cap["transparent"], "capture.transparent", *k.transparent, listens);
    }
    if (cap["explicit"].IsDefined()) {
      k.explicit_proxy = r.address(cap, "capture", "explicit", true, {}, true);
      check_listen(r, cap["explicit"], "capture.explicit", *k.explicit_proxy, listens);
    }
    if (cap["inbound"].IsDefined()) {
      k.inbound = r.address(cap, "capture", "inbound", true, {}, true);
      check_listen(r, cap["inbound"], "capture.inbound", *k.inbound, listens);
    }
    const std::string plain = r.string_field(cap, "capture", "inbound_plaintext", false, "deny");
    if (plain != "allow" && plain != "deny")
      r.fail(cap["inbound_plaintext"], "capture.inbound_plaintext",
             "expected allow (pass plain TCP to the app, as Istio's PERMISSIVE) or deny (STRICT)");
    k.inbound_plaintext_allowed = plain == "allow";
    if (!k.transparent && !k.explicit_proxy && !k.inbound)
      r.fail(cap, "capture",
             "give 'transparent' (e.g. 127.0.0.1:15001), 'explicit' (e.g. 127.0.0.1:15080), "
             "'inbound' (e.g. 0.0.0.0:15006) or several");
    k.detect_timeout = r.duration(cap, "capture", "detect_timeout", k.detect_timeout);
    if (k.detect_timeout > std::chrono::seconds(1))
      r.fail(cap["detect_timeout"], "capture.detect_timeout",
             "at most 1s: a server-first protocol waits this long for its first byte");
    k.handshake_timeout = r.duration(cap, "capture", "handshake_timeout", k.handshake_timeout);
    const auto ports = r.sequence(cap, "opaque_ports");
    for (size_t i = 0; i < ports.size(); ++i) {
      const std::string f = "capture.opaque_ports[" + std::to_string(i) + "]";
      YAML::Node holder;
      holder["p"] = ports[i];
      k.opaque_ports.push_back(static_cast<uint16_t>(r.number(holder, f, "p", 0, 1, 65535)));
    }
    const std::string egress = r.string_field(cap, "capture", "egress", false, "allow");
    if (egress != "allow" && egress != "deny")
      r.fail(cap["egress"], "capture.egress",
             "expected allow or deny (destinations that are no mesh service)");
    k.egress_allowed = egress == "allow";
    const auto users = r.sequence(cap, "users");
    for (size_t i = 0; i < users.size(); ++i) {
      const std::string f = "capture.users[" + std::to_string(i) + "]";
      r.require_map(users[i], f, {"name", "password"});
      CaptureConfig::User u{r.string_field(users[i], f, "name", true),
                            r.string_field(users[i], f, "password", true)};
      if (u.name.empty() || u.name.size() > 255 || u.password.size() > 255)
        r.fail(users[i], f, "name (1-255 bytes) and password (up to 255) as SOCKS5 allows");
      k.users.push_back(std::move(u));
    }
    // No open proxy: without users, only this host may use the explicit proxy.
    if (k.explicit_proxy && k.users.empty() && k.explicit_proxy->host != "127.0.0.1" &&
        k.explicit_proxy->host != "::1" && k.explicit_proxy->host != "localhost")
      r.fail(cap["explicit"], "capture.explicit",
             "an explicit proxy without 'users' may only bind a loopback address (no open proxy)");
  }

  if (auto id = root["identity"]; id.IsDefined()) {
    r.require_map(id, "identity",
                  {"cert", "key", "ca", "trust_domain", "sds", "namespace", "service_account"});
    if (id["sds"].IsDefined()) {
      for (const char* file : {"cert", "key", "ca"})
        if (id[file].IsDefined())
          r.fail(id[file], std::string("identity.") + file,
                 "not with 'sds': the agent's SDS socket provides the certificate, key and CA");
      c.identity.sds = r.path(id, "identity", "sds");
      c.identity.sds_namespace = r.string_field(id, "identity", "namespace", true);
      c.identity.sds_service_account = r.string_field(id, "identity", "service_account", true);
      for (const char* key : {"namespace", "service_account"}) {
        const std::string v = r.string_field(id, "identity", key, true);
        if (!is_valid_label(v))
          r.fail(id[key], std::string("identity.") + key,
                 "'" + v + "' is not a valid name: 1-63 of a-z, 0-9, '-', '.', '_'");
      }
    } else {
      if (id["namespace"].IsDefined() || id["service_account"].IsDefined())
        r.fail(id, "identity", "namespace and service_account go with 'sds' (the agent's socket)");
      c.identity.cert = r.path(id, "identity", "cert");
      c.identity.key = r.path(id, "identity", "key");
      c.identity.ca = r.path(id, "identity", "ca");
    }
    c.identity.trust_domain = r.string_field(id, "identity", "trust_domain", false);
    if (!c.identity.trust_domain.empty()) {
      if (auto td = parse_trust_domain(c.identity.trust_domain); !td)
        r.fail(id["trust_domain"], "identity.trust_domain", td.error());
    }
  } else if (c.needs_identity()) {
    r.fail(root, "identity",
           "is required when 'outbound' or 'inbound' is set: give cert, key and ca files "
           "(create them with 'weft ca init' and 'weft cert issue'), or the agent's SDS socket "
           "with sds, namespace and service_account");
  }
  if (c.services_from_agent && !c.identity.from_sds())
    r.fail(root["services_from_agent"], "services_from_agent",
           "needs identity.sds: the services come from the agent's SDS socket");
  if (c.outbound.empty() && !c.inbound.enabled && c.l4.empty() && !c.captures())
    r.fail(root, "outbound",
           "nothing to do: configure at least one of outbound, inbound, l4 or capture");
  return c;
}

}  // namespace

ProxyConfig parse_proxy_config(std::string_view yaml, const std::string& source,
                               const fs::path& base) {
  try {
    return parse_checked(yaml, source, base);
  } catch (const YAML::Exception& e) {
    // Anything yaml-cpp still objects to (odd node types, conversions) is a config error too.
    throw ConfigError(source + ":" + std::to_string(e.mark.line + 1) + ":" +
                      std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
}

ProxyConfig load_proxy_config(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw ConfigError(file.string() + ": cannot read the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_proxy_config(ss.str(), file.string(), fs::absolute(file).parent_path());
}

boost::json::value ProxyConfig::to_json() const {
  namespace json = boost::json;
  json::object o;
  o["source"] = source.string();
  o["workers"] = workers;
  o["admin"] = admin.to_string();
  o["drain_timeout"] = format_duration(drain_timeout);
  o["access_log"] = access_log;
  // Paths only: key material never appears in output.
  if (identity.from_sds())
    o["identity"] = {{"sds", identity.sds.string()},
                     {"namespace", identity.sds_namespace},
                     {"service_account", identity.sds_service_account},
                     {"trust_domain", identity.trust_domain}};
  else
    o["identity"] = {{"cert", identity.cert.string()},
                     {"key", identity.key.string()},
                     {"ca", identity.ca.string()},
                     {"trust_domain", identity.trust_domain}};
  json::array svcs;
  for (const auto& s : services) {
    json::array addrs, ids, dests;
    for (const auto& a : s.addresses) addrs.push_back(json::value(a.to_string()));
    for (const auto& i : s.spiffe_ids) ids.push_back(json::value(i));
    for (const auto& d : s.destinations) dests.push_back(json::value(d.to_string()));
    svcs.push_back(json::object{{"name", s.name},
                                {"addresses", addrs},
                                {"authority", s.authority},
                                {"spiffe_ids", ids},
                                {"destinations", dests}});
  }
  o["services"] = svcs;
  json::array outs;
  for (const auto& l : outbound)
    outs.push_back(
        json::object{{"name", l.name}, {"listen", l.listen.to_string()}, {"service", l.service}});
  o["outbound"] = outs;
  json::array targets;
  for (const auto& t : inbound.targets) {
    json::array allow, deny;
    for (const auto& a : t.allow) allow.push_back(json::value(a));
    for (const auto& d : t.deny) deny.push_back(json::value(d));
    targets.push_back(json::object{{"authority", t.authority},
                                   {"address", t.address.to_string()},
                                   {"allow", allow},
                                   {"deny", deny}});
  }
  if (inbound.enabled)
    o["inbound"] = json::object{{"listen", inbound.listen.to_string()}, {"targets", targets}};
  json::array l4s;
  for (const auto& l : l4)
    l4s.push_back(json::object{
        {"name", l.name}, {"listen", l.listen.to_string()}, {"upstream", l.upstream.to_string()}});
  o["l4"] = l4s;
  if (captures()) {
    json::array opaque, users;
    for (auto port : capture.opaque_ports) opaque.push_back(port);
    for (const auto& u : capture.users) users.push_back(json::value(u.name));  // no passwords
    o["capture"] = {{"transparent", capture.transparent ? capture.transparent->to_string() : ""},
                    {"explicit", capture.explicit_proxy ? capture.explicit_proxy->to_string() : ""},
                    {"detect_timeout", format_duration(capture.detect_timeout)},
                    {"opaque_ports", opaque},
                    {"inbound", capture.inbound ? capture.inbound->to_string() : ""},
                    {"inbound_plaintext", capture.inbound_plaintext_allowed ? "allow" : "deny"},
                    {"egress", capture.egress_allowed ? "allow" : "deny"},
                    {"users", users}};
  }
  o["pool"] = {{"max_streams", pool.max_streams},
               {"idle_timeout", format_duration(pool.idle_timeout)},
               {"connect_timeout", format_duration(pool.connect_timeout)}};
  o["services_from_agent"] = services_from_agent;
  return o;
}

}  // namespace weft
