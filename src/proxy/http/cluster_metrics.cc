#include "proxy/http/cluster_metrics.h"

#include "stats/prometheus_text.h"

namespace weft {

namespace {

void family(std::string& out, const char* name, const char* type, const char* help) {
  out.append("# HELP ").append(name).append(" ").append(help).append("\n# TYPE ");
  out.append(name).append(" ").append(type).append("\n");
}

}  // namespace

void write_cluster_metrics(const HttpRuntime& http, SteadyMillis now, std::string& out) {
  struct PerService {
    const char* name;
    const char* type;
    const char* help;
    uint64_t (*value)(const BreakerState&);
  };
  static const PerService kPerService[] = {
      {"weft_http_breaker_overflows_total", "counter",
       "Requests answered 503 because a circuit breaker was open",
       [](const BreakerState& b) -> uint64_t { return b.overflows.load(); }},
      {"weft_http_outlier_ejections_total", "counter", "Endpoints ejected by outlier detection",
       [](const BreakerState& b) -> uint64_t { return b.ejections_total.load(); }},
      {"weft_http_upstream_requests_active", "gauge",
       "Requests in flight to the service (the max_requests breaker counts these)",
       [](const BreakerState& b) -> uint64_t { return b.requests.load(); }},
      {"weft_http_upstream_connections_active", "gauge",
       "Open upstream connections to the service (max_connections)",
       [](const BreakerState& b) -> uint64_t { return b.connections.load(); }},
      {"weft_http_upstream_pending_active", "gauge",
       "Upstream connections being opened for waiting requests (max_pending)",
       [](const BreakerState& b) -> uint64_t { return b.pending.load(); }},
      {"weft_http_retries_active", "gauge",
       "Requests being retried (the retry budget counts these)",
       [](const BreakerState& b) -> uint64_t { return b.retries.load(); }},
  };
  const auto& clusters = http.clusters();
  for (const auto& m : kPerService) {
    family(out, m.name, m.type, m.help);
    for (const auto& [name, c] : clusters)
      out.append(m.name)
          .append("{service=\"")
          .append(prometheus_label(name))
          .append("\"} ")
          .append(std::to_string(m.value(c->breakers())))
          .append("\n");
  }
  family(out, "weft_http_endpoint_available", "gauge",
         "1 when the endpoint takes requests: healthy and not ejected");
  for (const auto& [name, c] : clusters)
    for (const auto& e : c->endpoints())
      out.append("weft_http_endpoint_available{service=\"")
          .append(prometheus_label(name))
          .append("\",endpoint=\"")
          .append(prometheus_label(e.config.key()))
          .append("\"} ")
          .append(e.available(now) ? "1" : "0")
          .append("\n");
}

}  // namespace weft
