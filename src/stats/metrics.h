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

struct Counter {
  std::atomic<uint64_t> value{0};
  void inc(uint64_t n = 1) { value.fetch_add(n, std::memory_order_relaxed); }
  void dec(uint64_t n = 1) { value.fetch_sub(n, std::memory_order_relaxed); }
  uint64_t get() const { return value.load(std::memory_order_relaxed); }
};

class Metrics {
 public:
  std::shared_ptr<TcpCounters> tcp(const TcpLabels& labels);

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
};

}  // namespace weft
