#include "proxy/http/cluster.h"

#include <algorithm>

#include "proxy/http/hmac_signing.h"

namespace weft {

SteadyMillis steady_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// FNV-1a then a splitmix finish: stable across processes, so every proxy of a fleet maps a key
// to the same endpoint.
uint64_t hash64(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

int Cluster::pick_untried(std::string_view hash_key, int avoid, std::mt19937_64& rng,
                          SteadyMillis now, uint64_t& tried) const {
  const int n = static_cast<int>(endpoints_.size());
  int e = -1;
  for (int k = 0; k <= n; ++k) {
    e = pick(hash_key, avoid, rng(), now);
    if (e < 0 || e >= 64 || !(tried & (1ull << e))) break;
  }
  if (e >= 0 && e < 64) tried |= 1ull << e;
  return e;
}

int Cluster::pick(std::string_view hash_key, int avoid, uint64_t random, SteadyMillis now) const {
  const int n = static_cast<int>(endpoints_.size());
  if (n == 0) return -1;
  if (n == 1) return 0;

  if (service_.http.balancer == HttpServiceConfig::Balancer::ring_hash) {
    // The first available endpoint clockwise from the key's point; ejected ones are passed
    // over so their keys move to the next endpoint and come back when it returns.
    const uint64_t point = hash64(hash_key);
    auto it = std::lower_bound(ring_.begin(), ring_.end(), std::make_pair(point, -1));
    for (size_t step = 0; step < ring_.size(); ++step, ++it) {
      if (it == ring_.end()) it = ring_.begin();
      const int i = it->second;
      if (endpoints_[i].available(now) && i != avoid) return i;
    }
    // None available: the key's own endpoint (panic).
    it = std::lower_bound(ring_.begin(), ring_.end(), std::make_pair(point, -1));
    return (it == ring_.end() ? ring_.begin() : it)->second;
  }

  // Candidates: available, not `avoid`, in our locality when any there is available.
  int candidates[64];
  int count = 0;
  auto gather = [&](bool same_locality_only, bool need_available) {
    count = 0;
    for (int i = 0; i < n && count < 64; ++i) {
      if (i == avoid) continue;
      if (need_available && !endpoints_[i].available(now)) continue;
      if (same_locality_only && endpoints_[i].config.locality != locality_) continue;
      candidates[count++] = i;
    }
  };
  if (!locality_.empty()) gather(true, true);
  if (count == 0) gather(false, true);
  if (count == 0) gather(false, false);  // panic: all ejected
  if (count == 0) return avoid;          // only the one we wanted to avoid

  auto weighted = [&](uint64_t r) {
    uint64_t total = 0;
    for (int k = 0; k < count; ++k) total += endpoints_[candidates[k]].config.weight;
    uint64_t x = r % total;
    for (int k = 0; k < count; ++k) {
      const uint64_t w = endpoints_[candidates[k]].config.weight;
      if (x < w) return candidates[k];
      x -= w;
    }
    return candidates[count - 1];
  };
  if (service_.http.balancer == HttpServiceConfig::Balancer::least_request) {
    // Power of two choices: two weighted random picks, the one with fewer requests in flight.
    const int a = weighted(random);
    const int b = weighted(random >> 21 ^ random * 0x9e3779b97f4a7c15ull);
    const auto load = [&](int i) {
      return endpoints_[i].state->active_requests.load(std::memory_order_relaxed);
    };
    return load(b) < load(a) ? b : a;
  }
  return weighted(breakers_->rr.fetch_add(1, std::memory_order_relaxed));
}

void Cluster::record(int index, bool failure, SteadyMillis now) const {
  if (index < 0 || index >= static_cast<int>(endpoints_.size())) return;
  EndpointState& s = *endpoints_[index].state;
  const auto& o = service_.http.outlier;
  if (!failure) {
    s.consecutive_failures.store(0, std::memory_order_relaxed);
    return;
  }
  if (o.consecutive_errors == 0) return;
  if (s.consecutive_failures.fetch_add(1, std::memory_order_relaxed) + 1 < o.consecutive_errors)
    return;
  // Eject, unless that would take out more than max_ejection_percent of the endpoints.
  size_t ejected = 0;
  for (const auto& e : endpoints_)
    if (e.state->ejected_until.load(std::memory_order_relaxed) > now) ++ejected;
  if ((ejected + 1) * 100 > endpoints_.size() * o.max_ejection_percent) return;
  const uint32_t times = s.ejections.fetch_add(1, std::memory_order_relaxed) + 1;
  // base × times, at most 10 × base (Envoy's max_ejection_time default is 300 s for 30 s base).
  const int64_t ms = o.base_ejection.count() * std::min<uint32_t>(times, 10);
  s.ejected_until.store(now + ms, std::memory_order_relaxed);
  s.consecutive_failures.store(0, std::memory_order_relaxed);
  breakers_->ejections_total.fetch_add(1, std::memory_order_relaxed);
}

bool Cluster::retry_allowed() const {
  const auto& b = *breakers_;
  const uint32_t retries = b.retries.load(std::memory_order_relaxed);
  if (retries >= service_.http.breakers.max_retries) return false;
  const uint64_t budget = std::max<uint64_t>(service_.http.retry_budget_min,
                                             uint64_t(b.requests.load(std::memory_order_relaxed)) *
                                                 service_.http.retry_budget_percent / 100);
  return retries < budget;
}

bool TokenBucket::take(SteadyMillis now) {
  std::lock_guard lock(mutex_);
  if (last_ != 0) tokens_ = std::min(burst_, tokens_ + double(now - last_) * rate_ / 1000.0);
  last_ = now;
  if (tokens_ < 1.0) return false;
  tokens_ -= 1.0;
  return true;
}

bool RateLimiter::allow(const std::string& source, SteadyMillis now) {
  std::shared_ptr<TokenBucket> bucket;
  {
    std::lock_guard lock(mutex_);
    if (!policy_.per_source) {
      if (!route_bucket_)
        route_bucket_ = std::make_shared<TokenBucket>(policy_.per_second, policy_.burst);
      bucket = route_bucket_;
    } else {
      auto& slot = buckets_[source];
      if (!slot) {
        // Bounded: a flood of distinct sources resets the table rather than growing it.
        if (buckets_.size() > 10000) {
          buckets_.clear();
          auto& fresh = buckets_[source];
          fresh = std::make_shared<TokenBucket>(policy_.per_second, policy_.burst);
          bucket = fresh;
        } else {
          slot = std::make_shared<TokenBucket>(policy_.per_second, policy_.burst);
          bucket = slot;
        }
      } else {
        bucket = slot;
      }
    }
  }
  return bucket->take(now);
}

std::shared_ptr<const HttpRuntime> HttpRuntime::build(std::shared_ptr<const ProxyConfig> config,
                                                      const HttpRuntime* previous) {
  auto rt = std::make_shared<HttpRuntime>();
  rt->config_ = config;
  // Inbound http targets: a service of one direct endpoint (the local app) per target.
  std::vector<ServiceConfig> services = config->services;
  for (const auto& t : config->inbound.targets) {
    if (!t.http) continue;
    ServiceConfig s;
    s.name = "inbound|" + t.authority;
    EndpointConfig e;
    e.address = t.address;
    e.authority = t.authority;
    e.direct = true;
    s.endpoints.push_back(e);
    s.http.h2 = t.app_h2;
    services.push_back(s);
    auto in = std::make_shared<InboundHttp>();
    RouteConfig route;
    route.name = "inbound";
    route.backends.push_back({s.name, 1});
    in->routes.push_back(route);
    const InboundHttp* old = previous ? previous->inbound(t.authority) : nullptr;
    if (t.rate_limit.per_second > 0) {
      const bool same = old && old->limiter &&
                        old->limiter->policy().per_second == t.rate_limit.per_second &&
                        old->limiter->policy().burst == t.rate_limit.burst;
      in->limiter = same ? old->limiter : std::make_shared<RateLimiter>(t.rate_limit);
    }
    in->nonces = old ? old->nonces
                     : std::make_shared<NonceCache>(
                           std::chrono::duration_cast<std::chrono::seconds>(2 * t.hmac.max_skew));
    rt->inbound_[t.authority] = std::move(in);
  }
  for (const auto& s : services) {
    auto c = std::make_shared<Cluster>();
    c->service_ = s;
    c->locality_ = config->locality;
    const Cluster* old = previous ? previous->cluster(s.name) : nullptr;
    c->breakers_ = old ? old->breakers_ : std::make_shared<BreakerState>();
    for (const auto& e : s.endpoints) {
      std::shared_ptr<EndpointState> state;
      if (old)
        for (const auto& oe : old->endpoints_)
          if (oe.config.key() == e.key()) state = oe.state;
      c->endpoints_.push_back(
          {e, state ? state : std::make_shared<EndpointState>(), s.name + "|" + e.key()});
    }
    if (s.http.balancer == HttpServiceConfig::Balancer::ring_hash) {
      // 100 points per unit of weight: keys spread within a few percent of the weights.
      for (size_t i = 0; i < c->endpoints_.size(); ++i)
        for (unsigned k = 0; k < 100 * c->endpoints_[i].config.weight; ++k)
          c->ring_.emplace_back(hash64(c->endpoints_[i].config.key() + "#" + std::to_string(k)),
                                static_cast<int>(i));
      std::sort(c->ring_.begin(), c->ring_.end());
    }
    rt->clusters_[s.name] = std::move(c);
  }
  for (const auto& l : config->outbound)
    for (const auto& r : l.routes) {
      if (r.rate_limit.per_second <= 0) continue;
      const std::string key = l.name + "/" + r.name;
      std::shared_ptr<RateLimiter> limiter;
      if (previous)
        if (auto it = previous->limiters_.find(key); it != previous->limiters_.end()) {
          const auto& p = it->second->policy();
          if (p.per_second == r.rate_limit.per_second && p.burst == r.rate_limit.burst &&
              p.per_source == r.rate_limit.per_source)
            limiter = it->second;
        }
      rt->limiters_[key] = limiter ? limiter : std::make_shared<RateLimiter>(r.rate_limit);
    }
  return rt;
}

const Cluster* HttpRuntime::cluster(const std::string& service) const {
  auto it = clusters_.find(service);
  return it == clusters_.end() ? nullptr : it->second.get();
}

const InboundHttp* HttpRuntime::inbound(const std::string& authority) const {
  auto it = inbound_.find(authority);
  return it == inbound_.end() ? nullptr : it->second.get();
}

RateLimiter* HttpRuntime::limiter(const std::string& listener, const std::string& route) const {
  auto it = limiters_.find(listener + "/" + route);
  return it == limiters_.end() ? nullptr : it->second.get();
}

}  // namespace weft
