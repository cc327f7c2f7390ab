#include "stats/metrics.h"

#include <sstream>

#include "stats/prometheus_text.h"

namespace weft {

std::shared_ptr<TcpCounters> Metrics::tcp(const TcpLabels& labels) {
  std::lock_guard lock(mutex_);
  auto& slot = tcp_[labels];
  if (!slot) slot = std::make_shared<TcpCounters>();
  return slot;
}

std::shared_ptr<HttpCounters> Metrics::http(const HttpLabels& labels) {
  std::lock_guard lock(mutex_);
  auto& slot = http_[labels];
  if (!slot) slot = std::make_shared<HttpCounters>();
  return slot;
}

Histogram::Histogram(std::initializer_list<double> b) {
  for (double v : b)
    if (size < kMaxBuckets) bounds[size++] = v;
}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < size && v > bounds[i]) ++i;
  counts[i].fetch_add(1, std::memory_order_relaxed);
  sum_micros.fetch_add(static_cast<uint64_t>(v * 1e6), std::memory_order_relaxed);
}

// Istio's default buckets.
HttpCounters::HttpCounters()
    : duration_ms({0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                   300000, 600000, 1800000, 3600000}),
      request_bytes({1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000}),
      response_bytes({1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000}) {}

namespace {

struct Simple {
  const char* name;
  const char* type;
  const char* help;
  const Counter* counter;
};

}  // namespace

std::string Metrics::prometheus() const {
  std::ostringstream out;
  const Simple simple[] = {
      {"downstream_connections_active", "gauge", "Connections from local apps or peers now open",
       &downstream_connections_active},
      {"downstream_connections_total", "counter", "Connections accepted on any listener",
       &downstream_connections_total},
      {"tls_handshake_errors_total", "counter",
       "TLS handshakes that failed (bad certificate, garbage, truncation)", &tls_handshake_errors},
      {"hbone_protocol_errors_total", "counter", "HBONE connections closed for bad HTTP/2",
       &hbone_protocol_errors},
      {"hbone_requests_rejected_total", "counter", "CONNECT requests answered 400, 401 or 503",
       &hbone_requests_rejected},
      {"hbone_connections_active", "gauge", "HBONE (HTTP/2 over mTLS) connections now open",
       &hbone_connections_active},
      {"hbone_streams_active", "gauge", "Tunnelled streams now open", &hbone_streams_active},
      {"upstream_connect_failures_total", "counter",
       "Failed connects to upstream peers or local apps", &upstream_connect_failures},
      {"config_reloads_total", "counter", "Successful config reloads", &config_reloads},
      {"config_reload_failures_total", "counter", "Refused config reloads (the old config stayed)",
       &config_reload_failures},
      {"certificate_reloads_total", "counter", "Certificate rotations picked up from disk",
       &certificate_reloads},
  };
  for (const auto& s : simple) {
    out << "# HELP weft_" << s.name << " " << s.help << "\n# TYPE weft_" << s.name << " " << s.type
        << "\nweft_" << s.name << " " << s.counter->get() << "\n";
  }
  std::lock_guard lock(mutex_);
  struct Family {
    const char* name;
    const char* help;
    std::atomic<uint64_t> TcpCounters::*field;
  };
  const Family families[] = {
      {"istio_tcp_connections_opened_total", "Total TCP connections opened", &TcpCounters::opened},
      {"istio_tcp_connections_closed_total", "Total TCP connections closed", &TcpCounters::closed},
      {"istio_tcp_sent_bytes_total", "Bytes sent in responses over TCP", &TcpCounters::sent_bytes},
      {"istio_tcp_received_bytes_total", "Bytes received in requests over TCP",
       &TcpCounters::received_bytes},
  };
  for (const auto& f : families) {
    out << "# HELP " << f.name << " " << f.help << "\n# TYPE " << f.name << " counter\n";
    for (const auto& [l, c] : tcp_) {
      out << f.name << "{reporter=\"" << prometheus_label(l.reporter) << "\",source_principal=\""
          << prometheus_label(l.source_principal) << "\",destination_principal=\""
          << prometheus_label(l.destination_principal) << "\",destination_service=\""
          << prometheus_label(l.destination_service) << "\",connection_security_policy=\""
          << prometheus_label(l.security_policy) << "\",request_protocol=\"tcp\"} "
          << ((*c).*(f.field)).load(std::memory_order_relaxed) << "\n";
    }
  }
  auto http_labels = [](const HttpLabels& l) {
    std::ostringstream o;
    o << "reporter=\"" << prometheus_label(l.reporter) << "\",source_principal=\""
      << prometheus_label(l.source_principal) << "\",destination_principal=\""
      << prometheus_label(l.destination_principal) << "\",destination_service=\""
      << prometheus_label(l.destination_service) << "\",connection_security_policy=\""
      << prometheus_label(l.security_policy) << "\",request_protocol=\"http\",response_code=\""
      << l.response_code << "\",response_flags=\"" << prometheus_label(l.response_flags) << "\"";
    return o.str();
  };
  out << "# HELP istio_requests_total Total requests\n# TYPE istio_requests_total counter\n";
  for (const auto& [l, c] : http_)
    out << "istio_requests_total{" << http_labels(l) << "} " << c->requests.load() << "\n";
  struct HistogramFamily {
    const char* name;
    const char* help;
    Histogram HttpCounters::*field;
  };
  const HistogramFamily histograms[] = {
      {"istio_request_duration_milliseconds", "Request duration", &HttpCounters::duration_ms},
      {"istio_request_bytes", "Request sizes (headers and body)", &HttpCounters::request_bytes},
      {"istio_response_bytes", "Response sizes (headers and body)", &HttpCounters::response_bytes},
  };
  for (const auto& f : histograms) {
    out << "# HELP " << f.name << " " << f.help << "\n# TYPE " << f.name << " histogram\n";
    for (const auto& [l, c] : http_) {
      const Histogram& h = (*c).*(f.field);
      const std::string labels = http_labels(l);
      uint64_t cumulative = 0;
      for (size_t i = 0; i <= h.size; ++i) {
        cumulative += h.counts[i].load(std::memory_order_relaxed);
        out << f.name << "_bucket{" << labels << ",le=\"";
        if (i == h.size)
          out << "+Inf";
        else
          out << h.bounds[i];
        out << "\"} " << cumulative << "\n";
      }
      out << f.name << "_sum{" << labels << "} "
          << static_cast<double>(h.sum_micros.load(std::memory_order_relaxed)) / 1e6 << "\n";
      out << f.name << "_count{" << labels << "} " << cumulative << "\n";
    }
  }
  return out.str();
}

boost::json::object Metrics::to_json() const {
  boost::json::object o;
  o["downstream_connections_active"] = downstream_connections_active.get();
  o["downstream_connections_total"] = downstream_connections_total.get();
  o["tls_handshake_errors"] = tls_handshake_errors.get();
  o["hbone_protocol_errors"] = hbone_protocol_errors.get();
  o["hbone_requests_rejected"] = hbone_requests_rejected.get();
  o["hbone_connections_active"] = hbone_connections_active.get();
  o["hbone_streams_active"] = hbone_streams_active.get();
  o["upstream_connect_failures"] = upstream_connect_failures.get();
  o["config_reloads"] = config_reloads.get();
  o["config_reload_failures"] = config_reload_failures.get();
  o["certificate_reloads"] = certificate_reloads.get();
  boost::json::array tcp;
  std::lock_guard lock(mutex_);
  for (const auto& [l, c] : tcp_) {
    tcp.push_back(boost::json::object{{"reporter", l.reporter},
                                      {"source_principal", l.source_principal},
                                      {"destination_principal", l.destination_principal},
                                      {"destination_service", l.destination_service},
                                      {"opened", c->opened.load()},
                                      {"closed", c->closed.load()},
                                      {"sent_bytes", c->sent_bytes.load()},
                                      {"received_bytes", c->received_bytes.load()}});
  }
  o["tcp"] = std::move(tcp);
  return o;
}

}  // namespace weft
