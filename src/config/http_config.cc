#include "config/http_config_yaml.h"

#include <re2/re2.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "core/ascii.h"

namespace weft {

const char* balancer_name(HttpServiceConfig::Balancer b) {
  switch (b) {
    case HttpServiceConfig::Balancer::round_robin:
      return "round_robin";
    case HttpServiceConfig::Balancer::least_request:
      return "least_request";
    case HttpServiceConfig::Balancer::ring_hash:
      return "ring_hash";
  }
  return "?";
}

namespace {

// RFC 9110 token characters: what a header name may contain.
bool is_token(std::string_view s) {
  if (s.empty()) return false;
  for (unsigned char c : s)
    if (!(std::isalnum(c) ||
          std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos))
      return false;
  return true;
}

bool is_header_value(std::string_view s) {
  for (unsigned char c : s)
    if (c == '\r' || c == '\n' || c == 0) return false;
  return true;
}

std::string header_name(const Reader& r, const YAML::Node& n, const std::string& field) {
  const std::string name = r.scalar(n, field);
  if (!is_token(name)) r.fail(n, field, "'" + name + "' is not a valid header name");
  return ascii_lower(name);
}

std::string header_value(const Reader& r, const YAML::Node& n, const std::string& field) {
  const std::string v = r.scalar(n, field);
  if (!is_header_value(v)) r.fail(n, field, "a header value may not contain CR, LF or NUL");
  return v;
}

double percent(const Reader& r, const YAML::Node& map, const std::string& parent, const char* key) {
  return r.decimal(map, parent, key, 0, 0, 100);
}

// A shared secret from a file: private (no group or other access, as ssh insists) and long
// enough to be a key. The bytes are the key; a trailing newline is dropped.
std::string read_key_file(const Reader& r, const YAML::Node& map, const std::string& parent,
                          const char* key) {
  const std::filesystem::path path = r.path(map, parent, key);
  const std::string field = Reader::join(parent, key);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) r.fail(map[key], field, "cannot read " + path.string());
  if (st.st_mode & 077)
    r.fail(map[key], field,
           path.string() + " is readable by group or others; chmod 600 it (it holds a key)");
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string k = ss.str();
  while (!k.empty() && (k.back() == '\n' || k.back() == '\r')) k.pop_back();
  if (k.size() < 16 || k.size() > 4096)
    r.fail(map[key], field,
           path.string() +
               " must hold 16 to 4096 bytes of key (e.g. head -c 32 /dev/urandom | "
               "base64 > key; chmod 600 key)");
  return k;
}

std::vector<std::string> header_names(const Reader& r, const YAML::Node& map,
                                      const std::string& parent, const char* key,
                                      std::vector<std::string> fallback) {
  if (!map[key].IsDefined()) return fallback;
  std::vector<std::string> out;
  const auto list = r.sequence(map, parent, key);
  for (size_t i = 0; i < list.size(); ++i)
    out.push_back(
        header_name(r, list[i], Reader::join(parent, key) + "[" + std::to_string(i) + "]"));
  return out;
}

PathMatch read_path(const Reader& r, const YAML::Node& n, const std::string& f) {
  PathMatch p;
  if (!n.IsDefined() || n.IsNull()) return p;
  r.require_map(n, f, {"exact", "prefix", "regex"});
  if (n.size() != 1) r.fail(n, f, "give exactly one of exact, prefix or regex");
  for (const auto& kv : n) {
    const std::string kind = kv.first.Scalar();
    p.value = r.scalar(kv.second, f + "." + kind);
    if (kind == "regex") {
      p.kind = PathMatch::Kind::regex;
      if (p.value.size() > 1000) r.fail(kv.second, f + ".regex", "longer than 1000 characters");
      // RE2 syntax (as Envoy's safe_regex), matched against the whole path without the query.
      RE2::Options options;
      options.set_log_errors(false);
      options.set_max_mem(1 << 20);
      auto re = std::make_shared<const RE2>(p.value, options);
      if (!re->ok())
        r.fail(kv.second, f + ".regex",
               "not a valid RE2 regular expression: " + re->error() +
                   " (no backreferences or lookaround; see github.com/google/re2/wiki/Syntax)");
      p.regex = std::move(re);
    } else {
      if (p.value.empty() || p.value[0] != '/')
        r.fail(kv.second, f + "." + kind, "a path starts with '/'");
      p.kind = kind == "exact" ? PathMatch::Kind::exact : PathMatch::Kind::prefix;
    }
  }
  return p;
}

RouteMatch read_match(const Reader& r, const YAML::Node& n, const std::string& f) {
  RouteMatch m;
  if (!n.IsDefined() || n.IsNull()) return m;
  r.require_map(n, f, {"host", "path", "method", "headers"});
  m.host = ascii_lower(r.string_field(n, f, "host", false));
  if (auto colon = m.host.rfind(':');
      colon != std::string::npos && m.host.find(']') == std::string::npos)
    r.fail(n["host"], f + ".host", "give the host without a port (it matches any port)");
  if (m.host.find('*') != std::string::npos && m.host.rfind("*.", 0) != 0)
    r.fail(n["host"], f + ".host", "a wildcard is only allowed as the first label: *.example.com");
  m.path = read_path(r, n["path"], f + ".path");
  m.method = r.string_field(n, f, "method", false);
  if (!m.method.empty() && !is_token(m.method))
    r.fail(n["method"], f + ".method", "'" + m.method + "' is not an HTTP method");
  const auto headers = r.sequence(n, f, "headers");
  for (size_t i = 0; i < headers.size(); ++i) {
    const std::string hf = f + ".headers[" + std::to_string(i) + "]";
    r.require_map(headers[i], hf, {"name", "value", "present"});
    HeaderMatch h;
    if (!headers[i]["name"].IsDefined()) r.fail(headers[i], hf + ".name", "is required");
    h.name = header_name(r, headers[i]["name"], hf + ".name");
    h.present = r.boolean(headers[i], hf, "present", false);
    if (headers[i]["value"].IsDefined())
      h.value = header_value(r, headers[i]["value"], hf + ".value");
    else if (!h.present)
      r.fail(headers[i], hf, "give 'value' (exact match) or 'present: true'");
    m.headers.push_back(std::move(h));
  }
  return m;
}

HeaderRewrite read_rewrite(const Reader& r, const YAML::Node& n, const std::string& f) {
  HeaderRewrite h;
  if (!n.IsDefined() || n.IsNull()) return h;
  r.require_map(n, f, {"add", "remove"});
  if (auto add = n["add"]; add.IsDefined()) {
    if (!add.IsMap()) r.fail(add, f + ".add", "expected a mapping of header: value");
    for (const auto& kv : add)
      h.add.emplace_back(header_name(r, kv.first, f + ".add"),
                         header_value(r, kv.second, f + ".add." + kv.first.Scalar()));
  }
  const auto remove = r.sequence(n, f, "remove");
  for (size_t i = 0; i < remove.size(); ++i)
    h.remove.push_back(header_name(r, remove[i], f + ".remove[" + std::to_string(i) + "]"));
  return h;
}

// Envoy's names for the gRPC statuses worth another try; 0 for anything else.
int grpc_retry_code(const std::string& name) {
  if (name == "cancelled") return 1;
  if (name == "deadline-exceeded") return 4;
  if (name == "resource-exhausted") return 8;
  if (name == "internal") return 13;
  if (name == "unavailable") return 14;
  return 0;
}

RetryPolicy read_retries(const Reader& r, const YAML::Node& n, const std::string& f) {
  RetryPolicy p;
  if (!n.IsDefined() || n.IsNull()) return p;
  r.require_map(n, f, {"attempts", "on", "backoff", "max_backoff", "per_try_timeout"});
  p.attempts = r.number(n, f, "attempts", 1, 0, 10);
  if (auto on = r.sequence(n, f, "on"); on.size()) {
    p.on_connect_failure = p.on_reset = p.on_5xx = false;
    for (size_t i = 0; i < on.size(); ++i) {
      const std::string v = r.scalar(on[i], f + ".on[" + std::to_string(i) + "]");
      if (v == "connect-failure")
        p.on_connect_failure = true;
      else if (v == "reset")
        p.on_reset = true;
      else if (v == "5xx")
        p.on_5xx = true;
      else if (const int code = grpc_retry_code(v); code > 0)
        p.on_grpc |= 1u << code;
      else
        r.fail(on[i], f + ".on[" + std::to_string(i) + "]",
               "'" + v +
                   "' is no retry condition; expected connect-failure, reset, 5xx, or for gRPC "
                   "cancelled, deadline-exceeded, internal, resource-exhausted or unavailable");
    }
  }
  p.backoff = r.duration(n, f, "backoff", p.backoff);
  p.max_backoff = r.duration(n, f, "max_backoff", std::max(p.max_backoff, p.backoff));
  if (p.max_backoff < p.backoff) r.fail(n["max_backoff"], f + ".max_backoff", "is below backoff");
  p.per_try_timeout = r.duration(n, f, "per_try_timeout", p.per_try_timeout);
  return p;
}

}  // namespace

RateLimitPolicy read_rate_limit(const Reader& r, const YAML::Node& n, const std::string& f) {
  RateLimitPolicy p;
  if (!n.IsDefined() || n.IsNull()) return p;
  r.require_map(n, f, {"per_second", "burst", "per"});
  if (!n["per_second"].IsDefined()) r.fail(n, f + ".per_second", "is required (requests a second)");
  p.per_second = r.decimal(n, f, "per_second", 0, 0.001, 1e9);
  p.burst = r.number(n, f, "burst", 0, 0, 1000000000);
  if (p.burst == 0) p.burst = std::max(1u, static_cast<unsigned>(p.per_second));
  const std::string per = r.string_field(n, f, "per", false, "route");
  if (per != "route" && per != "source")
    r.fail(n["per"], f + ".per", "expected route (one bucket) or source (one per client)");
  p.per_source = per == "source";
  return p;
}

namespace {

FaultPolicy read_fault(const Reader& r, const YAML::Node& n, const std::string& f) {
  FaultPolicy p;
  if (!n.IsDefined() || n.IsNull()) return p;
  r.require_map(n, f, {"delay", "abort"});
  if (auto d = n["delay"]; d.IsDefined()) {
    r.require_map(d, f + ".delay", {"percent", "duration"});
    p.delay_percent = percent(r, d, f + ".delay", "percent");
    if (!d["duration"].IsDefined()) r.fail(d, f + ".delay.duration", "is required, e.g. 100ms");
    p.delay = r.duration(d, f + ".delay", "duration", p.delay);
  }
  if (auto a = n["abort"]; a.IsDefined()) {
    r.require_map(a, f + ".abort", {"percent", "status"});
    p.abort_percent = percent(r, a, f + ".abort", "percent");
    p.abort_status = r.number(a, f + ".abort", "status", 503, 200, 599);
  }
  return p;
}

}  // namespace

std::vector<RouteConfig> read_routes(const Reader& r, const YAML::Node& list,
                                     const std::string& field) {
  std::vector<RouteConfig> routes;
  if (!list.IsDefined() || list.IsNull()) return routes;
  if (!list.IsSequence()) r.fail(list, field, "expected a list of routes");
  std::set<std::string> names;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string f = field + "[" + std::to_string(i) + "]";
    const YAML::Node n = list[i];
    r.require_map(n, f,
                  {"name", "match", "service", "backends", "timeout", "retries", "rate_limit",
                   "fault", "request_headers", "response_headers"});
    RouteConfig route;
    route.name = r.string_field(n, f, "name", false, "route-" + std::to_string(i));
    if (!names.insert(route.name).second)
      r.fail(n["name"], f + ".name", "duplicate route name '" + route.name + "'");
    route.match = read_match(r, n["match"], f + ".match");
    if (n["service"].IsDefined() == n["backends"].IsDefined())
      r.fail(n, f, "give 'service' (one backend) or 'backends' (weighted split), not both");
    if (n["service"].IsDefined()) {
      route.backends.push_back({r.string_field(n, f, "service", true), 1});
    } else {
      const auto backends = r.sequence(n, f, "backends");
      if (backends.size() == 0) r.fail(n["backends"], f + ".backends", "must not be empty");
      unsigned total = 0;
      for (size_t j = 0; j < backends.size(); ++j) {
        const std::string bf = f + ".backends[" + std::to_string(j) + "]";
        r.require_map(backends[j], bf, {"service", "weight"});
        WeightedBackend b{r.string_field(backends[j], bf, "service", true),
                          r.number(backends[j], bf, "weight", 1, 0, 10000)};
        total += b.weight;
        route.backends.push_back(std::move(b));
      }
      if (total == 0) r.fail(n["backends"], f + ".backends", "the weights add up to 0");
    }
    route.timeout = r.duration(n, f, "timeout", route.timeout);
    if (route.timeout.count() <= 0) r.fail(n["timeout"], f + ".timeout", "must be positive");
    route.retries = read_retries(r, n["retries"], f + ".retries");
    route.rate_limit = read_rate_limit(r, n["rate_limit"], f + ".rate_limit");
    route.fault = read_fault(r, n["fault"], f + ".fault");
    route.request_headers = read_rewrite(r, n["request_headers"], f + ".request_headers");
    route.response_headers = read_rewrite(r, n["response_headers"], f + ".response_headers");
    routes.push_back(std::move(route));
  }
  return routes;
}

HttpServiceConfig read_http_service(const Reader& r, const YAML::Node& n, const std::string& f) {
  HttpServiceConfig c;
  if (!n.IsDefined() || n.IsNull()) return c;
  r.require_map(n, f,
                {"load_balancer", "hash_on", "circuit_breakers", "outlier_detection",
                 "health_check", "idle_timeout", "retry_budget", "hmac", "protocol"});
  const std::string protocol = r.string_field(n, f, "protocol", false, "http1");
  if (protocol != "http1" && protocol != "http2" && protocol != "grpc")
    r.fail(n["protocol"], f + ".protocol",
           "'" + protocol + "' is unknown; expected http1, http2 or grpc (HTTP/2)");
  c.h2 = protocol != "http1";
  if (auto h = n["hmac"]; h.IsDefined()) {
    const std::string hf = f + ".hmac";
    r.require_map(h, hf, {"key_file", "from_agent", "signed_headers"});
    c.hmac.from_agent = r.boolean(h, hf, "from_agent", false);
    if (c.hmac.from_agent == h["key_file"].IsDefined())
      r.fail(h, hf, "give key_file (a 0600 file) or from_agent: true (control's pair key), one");
    if (!c.hmac.from_agent) c.hmac.key = read_key_file(r, h, hf, "key_file");
    c.hmac.signed_headers = header_names(r, h, hf, "signed_headers", c.hmac.signed_headers);
  }
  const std::string lb = r.string_field(n, f, "load_balancer", false, "round_robin");
  if (lb == "round_robin")
    c.balancer = HttpServiceConfig::Balancer::round_robin;
  else if (lb == "least_request")
    c.balancer = HttpServiceConfig::Balancer::least_request;
  else if (lb == "ring_hash")
    c.balancer = HttpServiceConfig::Balancer::ring_hash;
  else
    r.fail(n["load_balancer"], f + ".load_balancer",
           "'" + lb + "' is unknown; expected round_robin, least_request or ring_hash");
  const std::string hash_on = r.string_field(n, f, "hash_on", false, "source");
  if (n["hash_on"].IsDefined() && c.balancer != HttpServiceConfig::Balancer::ring_hash)
    r.fail(n["hash_on"], f + ".hash_on", "only with load_balancer: ring_hash");
  if (hash_on.rfind("header:", 0) == 0) {
    c.hash_header = ascii_lower(hash_on.substr(7));
    if (!is_token(c.hash_header))
      r.fail(n["hash_on"], f + ".hash_on", "'" + c.hash_header + "' is not a header name");
  } else if (hash_on != "source") {
    r.fail(n["hash_on"], f + ".hash_on", "expected source or header:<name>");
  }
  if (auto b = n["circuit_breakers"]; b.IsDefined()) {
    const std::string bf = f + ".circuit_breakers";
    r.require_map(b, bf, {"max_connections", "max_pending", "max_requests", "max_retries"});
    auto& k = c.breakers;
    k.max_connections = r.number(b, bf, "max_connections", k.max_connections, 1, 1000000);
    k.max_pending = r.number(b, bf, "max_pending", k.max_pending, 0, 1000000);
    k.max_requests = r.number(b, bf, "max_requests", k.max_requests, 1, 1000000);
    k.max_retries = r.number(b, bf, "max_retries", k.max_retries, 0, 1000000);
  }
  if (auto o = n["outlier_detection"]; o.IsDefined()) {
    const std::string of = f + ".outlier_detection";
    r.require_map(o, of, {"consecutive_errors", "base_ejection", "max_ejection_percent"});
    auto& k = c.outlier;
    k.consecutive_errors = r.number(o, of, "consecutive_errors", k.consecutive_errors, 0, 1000);
    k.base_ejection = r.duration(o, of, "base_ejection", k.base_ejection);
    k.max_ejection_percent =
        r.number(o, of, "max_ejection_percent", k.max_ejection_percent, 0, 100);
  }
  if (auto h = n["health_check"]; h.IsDefined()) {
    const std::string hf = f + ".health_check";
    r.require_map(
        h, hf, {"type", "path", "interval", "timeout", "unhealthy_threshold", "healthy_threshold"});
    auto& k = c.health;
    const std::string type = r.string_field(h, hf, "type", true);
    if (type == "tcp")
      k.kind = HealthCheckConfig::Kind::tcp;
    else if (type == "http")
      k.kind = HealthCheckConfig::Kind::http;
    else
      r.fail(h["type"], hf + ".type", "expected tcp (connects) or http (GET path, 2xx)");
    k.path = r.string_field(h, hf, "path", false, k.path);
    if (k.path.empty() || k.path[0] != '/' || !is_header_value(k.path) ||
        k.path.find(' ') != std::string::npos)
      r.fail(h["path"], hf + ".path", "expected a path such as /healthz");
    k.interval = r.duration(h, hf, "interval", k.interval);
    k.timeout = r.duration(h, hf, "timeout", k.timeout);
    if (k.interval.count() <= 0 || k.timeout.count() <= 0)
      r.fail(h, hf, "interval and timeout must be positive");
    k.unhealthy_threshold = r.number(h, hf, "unhealthy_threshold", k.unhealthy_threshold, 1, 100);
    k.healthy_threshold = r.number(h, hf, "healthy_threshold", k.healthy_threshold, 1, 100);
  }
  c.idle_timeout = r.duration(n, f, "idle_timeout", c.idle_timeout);
  if (c.idle_timeout.count() <= 0)
    r.fail(n["idle_timeout"], f + ".idle_timeout", "must be positive");
  if (auto b = n["retry_budget"]; b.IsDefined()) {
    const std::string bf = f + ".retry_budget";
    r.require_map(b, bf, {"percent", "min"});
    c.retry_budget_percent = r.number(b, bf, "percent", c.retry_budget_percent, 0, 100);
    c.retry_budget_min = r.number(b, bf, "min", c.retry_budget_min, 0, 100000);
  }
  return c;
}

HmacVerifyConfig read_hmac_verify(const Reader& r, const YAML::Node& n, const std::string& f) {
  HmacVerifyConfig c;
  if (!n.IsDefined() || n.IsNull()) return c;
  r.require_map(n, f, {"keys", "max_skew"});
  const auto keys = r.sequence(n, f, "keys");
  if (keys.size() == 0)
    r.fail(n, f + ".keys", "list {source: <SPIFFE ID pattern>, key_file: <path>}");
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string kf = f + ".keys[" + std::to_string(i) + "]";
    r.require_map(keys[i], kf, {"source", "key_file", "from_agent"});
    HmacVerifyConfig::Key k;
    k.source = r.string_field(keys[i], kf, "source", true);
    if (auto ok = check_identity_pattern(k.source); !ok)
      r.fail(keys[i]["source"], kf + ".source", ok.error());
    k.from_agent = r.boolean(keys[i], kf, "from_agent", false);
    if (k.from_agent == keys[i]["key_file"].IsDefined())
      r.fail(keys[i], kf,
             "give key_file (a 0600 file) or from_agent: true (control's pair key), one");
    if (k.from_agent) {
      if (auto exact = parse_spiffe_id(k.source); !exact)
        r.fail(keys[i]["source"], kf + ".source",
               "with from_agent the source is one exact workload ID (the key is per pair)");
    } else {
      k.key = read_key_file(r, keys[i], kf, "key_file");
    }
    c.keys.push_back(std::move(k));
  }
  c.max_skew = r.duration(n, f, "max_skew", c.max_skew);
  if (c.max_skew.count() <= 0) r.fail(n["max_skew"], f + ".max_skew", "must be positive");
  return c;
}

std::vector<AuthzRule> read_authz(const Reader& r, const YAML::Node& list,
                                  const std::string& field) {
  std::vector<AuthzRule> out;
  if (!list.IsDefined() || list.IsNull()) return out;
  if (!list.IsSequence()) r.fail(list, field, "expected a list of rules");
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string f = field + "[" + std::to_string(i) + "]";
    r.require_map(list[i], f, {"action", "sources", "methods", "paths"});
    AuthzRule rule;
    const std::string action = r.string_field(list[i], f, "action", true);
    if (action != "allow" && action != "deny")
      r.fail(list[i]["action"], f + ".action", "expected allow or deny");
    rule.allow = action == "allow";
    rule.sources = r.spiffe_list(list[i], f, "sources", true);
    const auto methods = r.sequence(list[i], f, "methods");
    for (size_t j = 0; j < methods.size(); ++j) {
      const std::string m = r.scalar(methods[j], f + ".methods[" + std::to_string(j) + "]");
      if (!is_token(m))
        r.fail(methods[j], f + ".methods[" + std::to_string(j) + "]", "not an HTTP method");
      rule.methods.push_back(m);
    }
    const auto paths = r.sequence(list[i], f, "paths");
    for (size_t j = 0; j < paths.size(); ++j) {
      const std::string pth = r.scalar(paths[j], f + ".paths[" + std::to_string(j) + "]");
      if (pth.empty() || pth[0] != '/')
        r.fail(paths[j], f + ".paths[" + std::to_string(j) + "]", "a path prefix starts with '/'");
      rule.paths.push_back(pth);
    }
    out.push_back(std::move(rule));
  }
  return out;
}

std::vector<EndpointConfig> read_endpoints(const Reader& r, const YAML::Node& list,
                                           const std::string& field) {
  std::vector<EndpointConfig> out;
  if (!list.IsSequence() || list.size() == 0)
    r.fail(list, field,
           "expected a non-empty list of {address: <peer proxy host:port>, authority: <target>}");
  std::set<std::string> seen;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string f = field + "[" + std::to_string(i) + "]";
    r.require_map(list[i], f, {"address", "authority", "weight", "locality"});
    EndpointConfig e;
    e.address = r.address(list[i], f, "address", true);
    e.authority = r.string_field(list[i], f, "authority", true);
    if (auto a = parse_host_port(e.authority); !a)
      r.fail(list[i]["authority"], f + ".authority", a.error());
    e.weight = r.number(list[i], f, "weight", 1, 1, 1000);
    e.locality = r.string_field(list[i], f, "locality", false);
    if (!seen.insert(e.key()).second) r.fail(list[i], f, "duplicate endpoint " + e.key());
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace weft
