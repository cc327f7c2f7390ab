#include "proxy/http/health_checker.h"

#include <boost/asio/write.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>

namespace weft {

namespace asio = boost::asio;
namespace http = boost::beast::http;

HealthChecker::HealthChecker(asio::io_context& io, UpstreamPool& pool)
    : io_(io), pool_(pool), timer_(io) {}

void HealthChecker::update(std::shared_ptr<const HttpRuntime> runtime) {
  runtime_ = std::move(runtime);
  if (!running_) {
    running_ = true;
    tick();
  }
}

void HealthChecker::stop() {
  running_ = false;
  timer_.cancel();
}

void HealthChecker::tick() {
  if (!running_) return;
  const SteadyMillis now = steady_now_ms();
  if (runtime_) {
    for (const auto& [name, cluster] : runtime_->clusters()) {
      const auto& hc = cluster->service().http.health;
      if (hc.kind == HealthCheckConfig::Kind::none) continue;
      for (int i = 0; i < static_cast<int>(cluster->endpoints().size()); ++i) {
        const std::string key = UpstreamPool::key(*cluster, i);
        if (in_flight_[key] || next_due_[key] > now) continue;
        next_due_[key] = now + hc.interval.count();
        in_flight_[key] = true;
        check(runtime_, *cluster, i);
      }
    }
  }
  timer_.expires_after(std::chrono::milliseconds(100));
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->tick();
  });
}

void HealthChecker::report(const Cluster& c, int ep, bool ok) {
  EndpointState& s = *c.endpoints()[ep].state;
  const auto& hc = c.service().http.health;
  if (ok) {
    s.health_failures = 0;
    if (++s.health_successes >= hc.healthy_threshold) s.healthy = true;
  } else {
    s.health_successes = 0;
    if (++s.health_failures >= hc.unhealthy_threshold) s.healthy = false;
  }
}

void HealthChecker::check(std::shared_ptr<const HttpRuntime> rt, const Cluster& c, int ep) {
  struct Probe {
    std::shared_ptr<const HttpRuntime> rt;
    const Cluster* cluster;
    int ep;
    std::string key;
    std::shared_ptr<UpstreamConn> conn;
    std::string request;
    http::response_parser<http::empty_body> parser;
    std::unique_ptr<asio::steady_timer> timer;
    bool done = false;
  };
  auto probe = std::make_shared<Probe>();
  probe->rt = std::move(rt);
  probe->cluster = &c;
  probe->ep = ep;
  probe->key = UpstreamPool::key(c, ep);
  probe->timer = std::make_unique<asio::steady_timer>(io_, c.service().http.health.timeout);
  auto finish = [self = shared_from_this(), probe](bool ok) {
    if (probe->done) return;
    probe->done = true;
    probe->timer->cancel();
    if (probe->conn) {
      boost::system::error_code ignored;
      probe->conn->socket.close();
    }
    self->in_flight_[probe->key] = false;
    report(*probe->cluster, probe->ep, ok);
  };
  probe->timer->async_wait([finish](const boost::system::error_code& ec) {
    if (!ec) finish(false);
  });
  pool_.open(
      c, ep, [probe, finish](std::shared_ptr<UpstreamConn> conn, const std::string& failure) {
        if (probe->done) return;
        if (!conn || !failure.empty()) return finish(false);
        probe->conn = std::move(conn);
        const auto& hc = probe->cluster->service().http.health;
        if (hc.kind == HealthCheckConfig::Kind::tcp) return finish(true);
        probe->request = "GET " + hc.path + " HTTP/1.1\r\nHost: " +
                         probe->cluster->endpoints()[probe->ep].config.authority +
                         "\r\nUser-Agent: weft-health-check\r\nConnection: close\r\n\r\n";
        asio::async_write(probe->conn->socket, asio::buffer(probe->request),
                          [probe, finish](const boost::system::error_code& ec, size_t) {
                            if (ec) return finish(false);
                            http::async_read_header(
                                probe->conn->socket, probe->conn->buffer, probe->parser,
                                [probe, finish](const boost::system::error_code& ec, size_t) {
                                  const unsigned status = probe->parser.get().result_int();
                                  finish(!ec && status >= 200 && status < 300);
                                });
                          });
      });
}

}  // namespace weft
