#include "config/proxy_config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>
#include <sstream>

#include <boost/json.hpp>

#include "config/http_config_yaml.h"
#include "config/yaml_reader.h"
#include "core/label.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace fs = std::filesystem;

namespace {

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
  r.require_map(root, "",
                {"identity", "workers", "admin", "drain_timeout", "cert_check_interval",
                 "access_log", "services", "outbound", "inbound", "l4", "capture", "pool",
                 "services_from_agent", "locality"});
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
  c.locality = r.string_field(root, "", "locality", false);
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
    r.require_map(
        n, f,
        {"name", "addresses", "authority", "spiffe_ids", "destinations", "endpoints", "http"});
    ServiceConfig s;
    s.name = r.string_field(n, f, "name", true);
    check_name(r, n["name"], f + ".name", s.name, service_names);
    s.http = read_http_service(r, n["http"], f + ".http");
    if (n["endpoints"].IsDefined()) {
      if (n["addresses"].IsDefined() || n["authority"].IsDefined())
        r.fail(n["endpoints"], f + ".endpoints",
               "give either 'endpoints' or 'addresses' with 'authority', not both");
      s.endpoints = read_endpoints(r, n["endpoints"], f + ".endpoints");
      // L4 connections need one authority: the first endpoint's, through any of the proxies.
      s.authority = s.endpoints.front().authority;
      for (const auto& e : s.endpoints)
        if (std::find(s.addresses.begin(), s.addresses.end(), e.address) == s.addresses.end())
          s.addresses.push_back(e.address);
    }
    const YAML::Node addrs = n["addresses"];
    if (s.endpoints.empty() && (!addrs.IsDefined() || !addrs.IsSequence() || addrs.size() == 0))
      r.fail(addrs.IsDefined() ? addrs : n, f + ".addresses",
             "expected a non-empty list of peer proxy addresses (host:port of their HBONE port)");
    for (size_t j = 0; s.endpoints.empty() && j < addrs.size(); ++j) {
      const std::string af = f + ".addresses[" + std::to_string(j) + "]";
      auto hp = parse_host_port(r.scalar(addrs[j], af));
      if (!hp) r.fail(addrs[j], af, hp.error());
      s.addresses.push_back(*hp);
    }
    if (s.endpoints.empty()) {
      s.authority = r.string_field(n, f, "authority", true);
      if (auto a = parse_host_port(s.authority); !a)
        r.fail(n["authority"], f + ".authority", a.error());
      for (const auto& a : s.addresses) s.endpoints.push_back({a, s.authority, 1, ""});
    }
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
    r.require_map(n, f, {"name", "listen", "service", "protocol", "routes", "max_request_body"});
    OutboundListenerConfig o;
    o.name = r.string_field(n, f, "name", true);
    check_name(r, n["name"], f + ".name", o.name, listener_names);
    o.listen = r.address(n, f, "listen", true, {}, true);
    check_listen(r, n["listen"], f + ".listen", o.listen, listens);
    const std::string protocol = r.string_field(n, f, "protocol", false, "tcp");
    if (protocol != "tcp" && protocol != "http")
      r.fail(n["protocol"], f + ".protocol",
             "expected tcp (opaque bytes) or http (HTTP/1.1 routing, balancing and retries)");
    o.http = protocol == "http";
    if (!o.http && (n["routes"].IsDefined() || n["max_request_body"].IsDefined()))
      r.fail(n["routes"].IsDefined() ? n["routes"] : n["max_request_body"], f,
             "routes and max_request_body need protocol: http");
    o.service = r.string_field(n, f, "service", !o.http || !n["routes"].IsDefined());
    o.routes = read_routes(r, n["routes"], f + ".routes");
    o.max_request_body = r.number(n, f, "max_request_body",
                                  static_cast<unsigned>(o.max_request_body), 0, 64u * 1024 * 1024);
    if (!o.service.empty()) {
      RouteConfig fallback;
      fallback.name = "default";
      fallback.backends.push_back({o.service, 1});
      if (o.http) o.routes.push_back(std::move(fallback));
    }
    // With services from the agent, a name may only be known once the agent sends it.
    std::vector<std::pair<std::string, YAML::Node>> refs;
    if (!o.service.empty()) refs.emplace_back(o.service, n["service"]);
    const YAML::Node route_nodes = n["routes"];
    const size_t declared = route_nodes.IsDefined() ? route_nodes.size() : 0;
    for (size_t j = 0; j < o.routes.size(); ++j)
      for (const auto& b : o.routes[j].backends)
        refs.emplace_back(b.service, j < declared ? route_nodes[j] : n);
    for (const auto& [name, node] : refs)
      if (!c.find_service(name) && !c.services_from_agent)
        r.fail(node, f,
               "no service named '" + name +
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
      r.require_map(n, f,
                    {"authority", "address", "allow", "deny", "protocol", "hmac", "authorization",
                     "rate_limit", "max_request_body"});
      InboundTargetConfig t;
      t.address = r.address(n, f, "address", true);
      t.authority = r.string_field(n, f, "authority", false, t.address.to_string());
      if (!authorities.insert(t.authority).second)
        r.fail(n, f + ".authority", "duplicate target '" + t.authority + "'");
      t.allow = r.spiffe_list(n, f, "allow", true);
      t.deny = r.spiffe_list(n, f, "deny", true);
      const std::string protocol = r.string_field(n, f, "protocol", false, "tcp");
      if (protocol != "tcp" && protocol != "http" && protocol != "http2" && protocol != "grpc")
        r.fail(n["protocol"], f + ".protocol", "expected tcp, http, http2 or grpc");
      t.http = protocol != "tcp";
      t.app_h2 = protocol == "http2" || protocol == "grpc";
      if (!t.http)
        for (const char* k : {"hmac", "authorization", "rate_limit", "max_request_body"})
          if (n[k].IsDefined()) r.fail(n[k], f + "." + k, "needs protocol: http");
      t.hmac = read_hmac_verify(r, n["hmac"], f + ".hmac");
      t.authz = read_authz(r, n["authorization"], f + ".authorization");
      t.rate_limit = read_rate_limit(r, n["rate_limit"], f + ".rate_limit");
      if (n["rate_limit"].IsDefined()) t.rate_limit.per_source = true;
      t.max_request_body = r.number(n, f, "max_request_body", 1024 * 1024, 0, 64u * 1024 * 1024);
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
  for (size_t i = 0; i < c.services.size(); ++i) {
    const auto& s = c.services[i];
    if (!s.http.hmac.from_agent) continue;
    const YAML::Node at = services[i]["http"]["hmac"];
    if (!c.identity.from_sds())
      r.fail(at, "services[" + std::to_string(i) + "].http.hmac.from_agent",
             "needs identity.sds: the key comes from the agent's SDS socket");
    if (s.spiffe_ids.size() != 1)
      r.fail(at, "services[" + std::to_string(i) + "].http.hmac.from_agent",
             "needs exactly one entry in spiffe_ids: the key is per (source, destination) pair");
  }
  for (const auto& t : c.inbound.targets)
    for (const auto& k : t.hmac.keys)
      if (k.from_agent && !c.identity.from_sds())
        r.fail(root["inbound"], "inbound.targets (" + t.authority + ").hmac.keys",
               "from_agent needs identity.sds: the key comes from the agent's SDS socket");
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
    json::array endpoints;
    for (const auto& e : s.endpoints)
      endpoints.push_back(json::object{{"address", e.address.to_string()},
                                       {"authority", e.authority},
                                       {"weight", e.weight},
                                       {"locality", e.locality}});
    svcs.push_back(json::object{{"name", s.name},
                                {"endpoints", endpoints},
                                {"load_balancer", balancer_name(s.http.balancer)},
                                {"addresses", addrs},
                                {"authority", s.authority},
                                {"spiffe_ids", ids},
                                {"destinations", dests}});
  }
  o["services"] = svcs;
  json::array outs;
  for (const auto& l : outbound) {
    json::array routes;
    for (const auto& r : l.routes) {
      json::array backends;
      for (const auto& b : r.backends)
        backends.push_back(json::object{{"service", b.service}, {"weight", b.weight}});
      routes.push_back(json::object{{"name", r.name},
                                    {"backends", backends},
                                    {"timeout", format_duration(r.timeout)},
                                    {"retries", r.retries.attempts}});
    }
    json::object out{{"name", l.name},
                     {"listen", l.listen.to_string()},
                     {"service", l.service},
                     {"protocol", l.http ? "http" : "tcp"}};
    if (l.http) out["routes"] = routes;
    outs.push_back(std::move(out));
  }
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
