// L7 runtime state shared by every worker: per service (cluster) the circuit-breaker counters,
// per endpoint the load, outlier and health state, per route the rate-limit buckets.
//
// The shape (which services, endpoints, routes) is immutable and rebuilt with each config
// snapshot; the mutable state lives in small shared objects that a rebuild carries over by
// name, so a reload neither resets an ejection nor forgets a breaker's count. The data path
// touches only atomics, except the token buckets (a short mutex each).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "config/proxy_config.h"

namespace weft {

using SteadyMillis = int64_t;  // steady clock, ms
SteadyMillis steady_now_ms();

struct EndpointState {
  std::atomic<uint32_t> active_requests{0};
  std::atomic<uint32_t> consecutive_failures{0};
  std::atomic<SteadyMillis> ejected_until{0};
  std::atomic<uint32_t> ejections{0};  // how many times; the next ejection lasts longer
  std::atomic<bool> healthy{true};     // active health checks
  std::atomic<uint32_t> health_failures{0}, health_successes{0};
};

struct BreakerState {
  std::atomic<uint32_t> connections{0};
  std::atomic<uint32_t> pending{0};
  std::atomic<uint32_t> requests{0};
  std::atomic<uint32_t> retries{0};
  std::atomic<uint64_t> rr{0};
  std::atomic<uint64_t> overflows{0}, ejections_total{0};
};

struct Endpoint {
  EndpointConfig config;
  std::shared_ptr<EndpointState> state;
  std::string pool_key;  // service|address/authority, made once: the pools look it up per request
  bool available(SteadyMillis now) const {
    return state->healthy.load(std::memory_order_relaxed) &&
           state->ejected_until.load(std::memory_order_relaxed) <= now;
  }
};

class Cluster {
 public:
  const ServiceConfig& service() const { return service_; }
  const std::vector<Endpoint>& endpoints() const { return endpoints_; }
  BreakerState& breakers() const { return *breakers_; }
  std::shared_ptr<BreakerState> breakers_ptr() const { return breakers_; }

  // Picks an endpoint for a request; `avoid` (an index, or -1) is skipped when others are
  // available (a retry goes elsewhere). Unavailable endpoints (ejected, unhealthy) are skipped
  // unless all are, as Envoy's panic mode: better to try than to fail every request.
  // `hash_key` is for ring_hash; `random` is a per-worker random number.
  int pick(std::string_view hash_key, int avoid, uint64_t random, SteadyMillis now) const;
  // pick() for a try of a request that already went to the endpoints in `tried` (bit i for
  // endpoint i < 64): one not tried yet when there is one (Envoy's previous_hosts predicate;
  // avoiding only the last can bounce between two bad ones). The pick joins `tried`.
  int pick_untried(std::string_view hash_key, int avoid, std::mt19937_64& rng, SteadyMillis now,
                   uint64_t& tried) const;

  // Outlier detection: the result of one attempt on endpoint `index`.
  void record(int index, bool failure, SteadyMillis now) const;

  // Retry budget: may one more retry start now?
  bool retry_allowed() const;

 private:
  friend class HttpRuntime;
  ServiceConfig service_;
  std::string locality_;  // the proxy's own
  std::vector<Endpoint> endpoints_;
  std::vector<std::pair<uint64_t, int>> ring_;  // ring_hash: (point, endpoint index), sorted
  std::shared_ptr<BreakerState> breakers_;
};

// A token bucket: `rate` tokens a second up to `burst`.
class TokenBucket {
 public:
  TokenBucket(double rate, double burst) : rate_(rate), burst_(burst), tokens_(burst) {}
  bool take(SteadyMillis now);

 private:
  std::mutex mutex_;
  double rate_, burst_, tokens_;
  SteadyMillis last_ = 0;
};

class RateLimiter {
 public:
  explicit RateLimiter(RateLimitPolicy policy) : policy_(policy) {}
  // False when the bucket for `source` (or the route's one) is empty.
  bool allow(const std::string& source, SteadyMillis now);
  const RateLimitPolicy& policy() const { return policy_; }

 private:
  RateLimitPolicy policy_;
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<TokenBucket>> buckets_;  // per source, bounded
  std::shared_ptr<TokenBucket> route_bucket_;
};

class NonceCache;

// An inbound target with protocol: http: its one route to the local app, and its state.
struct InboundHttp {
  std::vector<RouteConfig> routes;
  std::shared_ptr<RateLimiter> limiter;  // per source identity; null when none
  std::shared_ptr<NonceCache> nonces;    // HMAC replay protection
};

class HttpRuntime {
 public:
  // Builds the runtime for `config`, carrying state over from `previous` (may be null).
  static std::shared_ptr<const HttpRuntime> build(std::shared_ptr<const ProxyConfig> config,
                                                  const HttpRuntime* previous);

  const Cluster* cluster(const std::string& service) const;
  // Rate limiter of route `route` on listener `listener`, or null when none is configured.
  RateLimiter* limiter(const std::string& listener, const std::string& route) const;
  const std::map<std::string, std::shared_ptr<Cluster>>& clusters() const { return clusters_; }
  const InboundHttp* inbound(const std::string& authority) const;

 private:
  std::shared_ptr<const ProxyConfig> config_;
  std::map<std::string, std::shared_ptr<Cluster>> clusters_;
  std::map<std::string, std::shared_ptr<RateLimiter>> limiters_;
  std::map<std::string, std::shared_ptr<InboundHttp>> inbound_;
};

uint64_t hash64(std::string_view s);

}  // namespace weft
