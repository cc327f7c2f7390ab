// Process-wide counters, scraped by the admin thread. Counters are relaxed atomics bumped on the
// data path; the only lock is taken when a connection first needs a new label set (once per
// connection, never per byte), and by a scrape.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>

#include <boost/json/object.hpp>

namespace weft {

// Istio's standard TCP metric labels, so existing dashboards work unchanged.
struct TcpLabels {
  std::string reporter;  // "source" (outbound side) or "destination" (inbound side)
  std::string source_principal;
  std::string destination_principal;
  std::string destination_service;
  std::string security_policy;  // "mutual_tls" or "none"

  auto tie() const {
    return std::tie(reporter, source_principal, destination_principal, destination_service,
                    security_policy);
  }
  bool operator<(const TcpLabels& o) const { return tie() < o.tie(); }
};

struct TcpCounters {
  std::atomic<uint64_t> opened{0};
  std::atomic<uint64_t> closed{0};
  std::atomic<uint64_t> sent_bytes{0};      // towards the client that opened the connection
  std::atomic<uint64_t> received_bytes{0};  // from the client that opened the connection
};

// Istio's request metric labels (L7). response_flags follows Envoy: "-" none, UO overflow
// (a circuit breaker), UF connect failure, UR reset, UT timeout, NR no route, RL rate limited,
// FI fault injected, UH no healthy endpoint.
struct HttpLabels {
  std::string reporter;
  std::string source_principal;
  std::string destination_principal;
  std::string destination_service;
  std::string security_policy;
  unsigned response_code = 0;
  std::string response_flags;

  auto tie() const {
    return std::tie(reporter, source_principal, destination_principal, destination_service,
                    security_policy, response_code, response_flags);
  }
  bool operator<(const HttpLabels& o) const { return tie() < o.tie(); }
};

// The same labels without copies: what a request looks its counters up with (copied into
// HttpLabels only the first time a combination is seen).
struct HttpLabelsView {
  std::string_view reporter, source_principal, destination_principal, destination_service,
      security_policy;
  unsigned response_code = 0;
  std::string_view response_flags;

  auto tie() const {
    return std::tie(reporter, source_principal, destination_principal, destination_service,
                    security_policy, response_code, response_flags);
  }
  HttpLabels copy() const {
    return {std::string(reporter),
            std::string(source_principal),
            std::string(destination_principal),
            std::string(destination_service),
            std::string(security_policy),
            response_code,
            std::string(response_flags)};
  }
};
inline HttpLabelsView view_of(const HttpLabels& l) {
  return {l.reporter,        l.source_principal, l.destination_principal, l.destination_service,
          l.security_policy, l.response_code,    l.response_flags};
}
inline bool operator<(const HttpLabels& a, const HttpLabelsView& b) {
  return view_of(a).tie() < b.tie();
}
inline bool operator<(const HttpLabelsView& a, const HttpLabels& b) {
  return a.tie() < view_of(b).tie();
}

// A Prometheus histogram with fixed buckets; observe() is two relaxed atomic adds.
struct Histogram {
  static constexpr size_t kMaxBuckets = 20;
  explicit Histogram(std::initializer_list<double> bounds);
  void observe(double v);

  size_t size = 0;
  double bounds[kMaxBuckets] = {};
  std::atomic<uint64_t> counts[kMaxBuckets + 1] = {};  // the last is +Inf
  std::atomic<uint64_t> sum_micros{0};                 // sum ×1e6, so integers add atomically
};

struct HttpCounters {
  HttpCounters();
  std::atomic<uint64_t> requests{0};
  Histogram duration_ms, request_bytes, response_bytes;
};

struct Counter {
  std::atomic<uint64_t> value{0};
  void inc(uint64_t n = 1) { value.fetch_add(n, std::memory_order_relaxed); }
  void dec(uint64_t n = 1) { value.fetch_sub(n, std::memory_order_relaxed); }
  uint64_t get() const { return value.load(std::memory_order_relaxed); }
};

class Metrics {
 public:
  std::shared_ptr<TcpCounters> tcp(const TcpLabels& labels);
  std::shared_ptr<HttpCounters> http(const HttpLabels& labels);

  // weft_ counters and gauges; names are the Prometheus names without the prefix.
  Counter downstream_connections_active;
  Counter downstream_connections_total;
  Counter tls_handshake_errors;      // bad certs, garbage, truncated TLS
  Counter hbone_protocol_errors;     // bad HTTP/2 framing or non-CONNECT requests
  Counter hbone_requests_rejected;   // 400/401/503 answers
  Counter hbone_connections_active;  // pooled tunnels and accepted tunnels
  Counter hbone_streams_active;
  Counter upstream_connect_failures;
  Counter config_reloads;
  Counter config_reload_failures;
  Counter certificate_reloads;

  std::string prometheus() const;
  boost::json::object to_json() const;

 private:
  mutable std::mutex mutex_;
  std::map<TcpLabels, std::shared_ptr<TcpCounters>> tcp_;
  std::map<HttpLabels, std::shared_ptr<HttpCounters>> http_;
};

}  // namespace weft
