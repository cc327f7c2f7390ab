#include "proxy/http/request_policy.h"

#include <algorithm>

#include <fmt/format.h>

#include "identity/spiffe_id.h"
#include "proxy/http/hmac_signing.h"

namespace weft {

std::optional<LocalReply> inbound_rate_limited(const HttpListenerView& listener, SteadyMillis now) {
  const InboundTargetConfig& t = *listener.inbound;
  if (!listener.inbound_state->limiter ||
      listener.inbound_state->limiter->allow(listener.peer_identity, now))
    return std::nullopt;
  return LocalReply{429,
                    "rate limited: " + t.authority + " allows " +
                        fmt::format("{:g}", t.rate_limit.per_second) +
                        " requests a second per caller\n",
                    "RL",
                    {}};
}

std::optional<LocalReply> hmac_refusal(
    const HttpListenerView& listener, const InboundTargetConfig& target, std::string_view header,
    std::string_view method, std::string_view path_and_query, std::optional<std::string_view> body,
    const std::function<std::string(const std::string&)>& headers_of, std::string* key) {
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  const std::string& peer = listener.peer_identity;
  // A failed check takes no nonce slot, so trying a second key is sound.
  std::string verdict = "no HMAC key for caller " + peer;
  bool tried = false;
  for (const auto& k : target.hmac.keys) {
    if (!spiffe_pattern_matches(k.source, peer)) continue;
    std::string v = verify_request(
        k.key, header, method, path_and_query, body, headers_of, now,
        std::chrono::duration_cast<std::chrono::seconds>(listener.inbound->hmac.max_skew),
        *listener.inbound_state->nonces);
    if (!tried || v.empty()) verdict = std::move(v);
    tried = true;
    if (verdict.empty()) {
      if (key) *key = k.key;
      return std::nullopt;
    }
  }
  return LocalReply{401, "request signature refused: " + verdict + "\n", "UAEX", {}};
}

std::optional<LocalReply> authorization_refusal(const HttpListenerView& listener,
                                                std::string_view method, std::string_view path) {
  const InboundTargetConfig& t = *listener.inbound;
  const std::string& peer = listener.peer_identity;
  auto matches = [&](const AuthzRule& r) {
    auto any = [](const auto& list, auto pred) {
      return list.empty() || std::any_of(list.begin(), list.end(), pred);
    };
    return any(r.sources, [&](const std::string& p) { return spiffe_pattern_matches(p, peer); }) &&
           any(r.methods, [&](const std::string& m) { return m == method; }) &&
           any(r.paths, [&](const std::string& p) { return path.substr(0, p.size()) == p; });
  };
  bool has_allow = false, allowed = false;
  for (size_t i = 0; i < t.authz.size(); ++i) {
    const auto& r = t.authz[i];
    if (!r.allow && matches(r))
      return LocalReply{
          403,
          "RBAC: access denied (authorization[" + std::to_string(i) + "] denies " + peer + ")\n",
          "RBAC",
          {}};
    has_allow = has_allow || r.allow;
    allowed = allowed || (r.allow && matches(r));
  }
  if (has_allow && !allowed)
    return LocalReply{403,
                      "RBAC: access denied (no allow rule matches " + peer + " " +
                          std::string(method) + " " + std::string(path) + ")\n",
                      "RBAC",
                      {}};
  return std::nullopt;
}

std::optional<LocalReply> route_rate_limited(const HttpRuntime& http, const std::string& listener,
                                             const RouteConfig& route, const std::string& source,
                                             SteadyMillis now) {
  RateLimiter* limiter = http.limiter(listener, route.name);
  if (!limiter || limiter->allow(source, now)) return std::nullopt;
  return LocalReply{429,
                    "rate limited: route " + route.name + " allows " +
                        fmt::format("{:g}", route.rate_limit.per_second) + " requests a second" +
                        (route.rate_limit.per_source ? " per source" : "") + "\n",
                    "RL",
                    {}};
}

std::optional<LocalReply> take_request_slot(const Cluster& cluster) {
  auto& breakers = cluster.breakers();
  const unsigned max = cluster.service().http.breakers.max_requests;
  if (breakers.requests.load(std::memory_order_relaxed) >= max) {
    breakers.overflows.fetch_add(1, std::memory_order_relaxed);
    return LocalReply{503,
                      "circuit breaker max_requests of service '" + cluster.service().name +
                          "' is open (" + std::to_string(max) + " requests in flight)\n",
                      "UO", "max_requests"};
  }
  breakers.requests.fetch_add(1, std::memory_order_relaxed);
  return std::nullopt;
}

void release_request_slot(const Cluster& cluster) {
  cluster.breakers().requests.fetch_sub(1, std::memory_order_relaxed);
}

std::optional<LocalReply> take_connection_slot(const Cluster& cluster) {
  const auto& limits = cluster.service().http.breakers;
  auto& b = cluster.breakers();
  const char* tripped = nullptr;
  if (b.connections.load(std::memory_order_relaxed) >= limits.max_connections)
    tripped = "max_connections";
  else if (b.pending.load(std::memory_order_relaxed) >= limits.max_pending)
    tripped = "max_pending";
  if (!tripped) {
    b.pending.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  b.overflows.fetch_add(1, std::memory_order_relaxed);
  return LocalReply{503,
                    std::string("circuit breaker ") + tripped + " of service '" +
                        cluster.service().name + "' is open\n",
                    "UO", tripped};
}

bool fault_roll(std::mt19937_64& rng, double percent) {
  return percent > 0 && static_cast<double>(rng() % 1000000) < percent * 10000.0;
}

void record_request(HttpWorkerEnv& env, const HttpListenerView& listener, const Cluster* cluster,
                    const AccessLogEntry& entry, double duration_ms) {
  HttpLabelsView labels;
  if (listener.inbound) {
    labels.reporter = "destination";
    labels.source_principal = listener.peer_identity;
    labels.destination_principal = entry.local_identity;
    labels.destination_service = listener.inbound->authority;
  } else {
    labels.reporter = "source";
    labels.source_principal = entry.local_identity;
    labels.destination_service = cluster ? std::string_view(cluster->service().name) : "unknown";
    if (cluster && cluster->service().spiffe_ids.size() == 1)
      labels.destination_principal = cluster->service().spiffe_ids.front();
    else
      labels.destination_principal =
          entry.peer_identity.empty() ? std::string_view("unknown") : entry.peer_identity;
  }
  labels.security_policy = "mutual_tls";
  labels.response_code = entry.status;
  labels.response_flags = entry.response_flags;
  auto it = env.metric_cache.find(labels);
  if (it == env.metric_cache.end()) {
    HttpLabels copied = labels.copy();
    auto counters = env.metrics.http(copied);
    it = env.metric_cache.emplace(std::move(copied), std::move(counters)).first;
  }
  auto& slot = it->second;
  slot->requests.fetch_add(1, std::memory_order_relaxed);
  slot->duration_ms.observe(duration_ms);
  slot->request_bytes.observe(static_cast<double>(entry.bytes_received));
  slot->response_bytes.observe(static_cast<double>(entry.bytes_sent));
  env.access_log.write(entry);
}

std::optional<Millis> parse_grpc_timeout(std::string_view value) {
  if (value.size() < 2 || value.size() > 9) return std::nullopt;
  uint64_t n = 0;
  for (char c : value.substr(0, value.size() - 1)) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  // In milliseconds (8 digits of hours in nanoseconds would overflow 64 bits).
  uint64_t ms = 0;
  switch (value.back()) {
    case 'H':
      ms = n * 3'600'000;
      break;
    case 'M':
      ms = n * 60'000;
      break;
    case 'S':
      ms = n * 1'000;
      break;
    case 'm':
      ms = n;
      break;
    case 'u':
      ms = (n + 999) / 1'000;
      break;
    case 'n':
      ms = (n + 999'999) / 1'000'000;
      break;
    default:
      return std::nullopt;
  }
  return Millis(static_cast<Millis::rep>(ms));
}

}  // namespace weft
