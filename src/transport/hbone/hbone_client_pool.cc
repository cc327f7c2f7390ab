#include "transport/hbone/hbone_client_pool.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include "transport/hbone/tunnel_stream.h"

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

// Dials one service: tries each address in order, TCP then mTLS, then checks that the server's
// SPIFFE ID is one the service may present. Reports the first success or the last error.
class Dialer : public std::enable_shared_from_this<Dialer> {
 public:
  using Done = std::function<void(std::unique_ptr<H2Connection::Tls>, std::string peer_id,
                                  std::string error)>;

  Dialer(asio::io_context& io, ServiceConfig service, std::shared_ptr<const TlsContexts> tls,
         Millis timeout, Metrics& metrics, Done done)
      : io_(io),
        service_(std::move(service)),
        tls_(std::move(tls)),
        timeout_(timeout),
        metrics_(metrics),
        resolver_(io),
        timer_(io),
        done_(std::move(done)) {}

  void start() { try_next(); }

  // Shutdown: the handshake handler owns this dialer and the dialer owns the socket holding the
  // handler; drop the handler so both can be freed.
  void abandon() {
    if (stream_) stream_->abandon_handshake();
  }

 private:
  void try_next() {
    if (index_ >= service_.addresses.size()) return finish(nullptr, "", last_error_);
    const HostPort& hp = service_.addresses[index_++];
    socket_ = std::make_unique<tcp::socket>(io_);
    timer_.expires_after(timeout_);
    timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (!ec) {
        self->timed_out_ = true;
        boost::system::error_code ignored;
        if (self->socket_) self->socket_->close(ignored);
        if (self->stream_) self->stream_->close();
      }
    });
    resolver_.async_resolve(
        hp.host, std::to_string(hp.port),
        [self = shared_from_this(), hp](const boost::system::error_code& ec,
                                        tcp::resolver::results_type results) {
          if (ec) return self->failed(hp, "cannot resolve: " + ec.message());
          asio::async_connect(
              *self->socket_, results,
              [self, hp](const boost::system::error_code& ec, const tcp::endpoint&) {
                if (ec) return self->failed(hp, "connect: " + self->why(ec));
                boost::system::error_code ignored;
                self->socket_->set_option(tcp::no_delay(true), ignored);
                // A failed attempt's TLS socket may still be on the call stack: park it.
                self->previous_stream_ = std::move(self->stream_);
                self->stream_ = std::make_unique<H2Connection::Tls>(
                    std::move(*self->socket_), self->tls_->client->native_handle(),
                    TlsSocket::Role::client);
                self->handshake(hp);
              });
        });
  }

  void handshake(const HostPort& hp) {
    stream_->async_handshake([self = shared_from_this(), hp](const boost::system::error_code& ec) {
      if (ec) {
        self->metrics_.tls_handshake_errors.inc();
        const std::string why = self->timed_out_ ? self->why(ec) : self->stream_->error();
        return self->failed(
            hp, "mTLS handshake: " + why + " (does the peer trust our CA, and we its?)");
      }
      auto peer = peer_spiffe_id(self->stream_->native_handle());
      const auto& ids = self->service_.spiffe_ids;
      if (!peer || std::find(ids.begin(), ids.end(), *peer) == ids.end()) {
        self->metrics_.tls_handshake_errors.inc();
        return self->failed(hp, "peer presented identity '" + peer.value_or("none") +
                                    "', which is not in services." + self->service_.name +
                                    ".spiffe_ids");
      }
      self->timer_.cancel();
      self->finish(std::move(self->stream_), *peer, "");
    });
  }

  std::string why(const boost::system::error_code& ec) const {
    return timed_out_ ? "timed out after " + format_duration(timeout_) : ec.message();
  }

  void failed(const HostPort& hp, const std::string& error) {
    timer_.cancel();
    timed_out_ = false;
    last_error_ = hp.to_string() + ": " + error;
    spdlog::warn("hbone: service '{}' via {}", service_.name, last_error_);
    try_next();
  }

  void finish(std::unique_ptr<H2Connection::Tls> tls, const std::string& peer,
              const std::string& error) {
    auto done = std::move(done_);
    if (done) done(std::move(tls), peer, error);
  }

  asio::io_context& io_;
  ServiceConfig service_;
  std::shared_ptr<const TlsContexts> tls_;
  Millis timeout_;
  Metrics& metrics_;
  tcp::resolver resolver_;
  asio::steady_timer timer_;
  Done done_;
  std::unique_ptr<tcp::socket> socket_;
  std::unique_ptr<H2Connection::Tls> stream_;
  std::unique_ptr<H2Connection::Tls> previous_stream_;
  size_t index_ = 0;
  bool timed_out_ = false;
  std::string last_error_ = "no addresses";
};

}  // namespace

HboneClientPool::HboneClientPool(asio::io_context& io, Metrics& metrics)
    : io_(io), metrics_(metrics) {}

HboneClientPool::~HboneClientPool() {
  *alive_ = false;
  for (auto& weak : dialers_)
    if (auto d = std::static_pointer_cast<Dialer>(weak.lock())) d->abandon();
}

void HboneClientPool::update(std::shared_ptr<const TlsContexts> tls, PoolConfig pool) {
  const bool rotated = tls_ && tls && tls_->generation != tls->generation;
  tls_ = std::move(tls);
  config_ = pool;
  if (rotated) retire_all();
}

void HboneClientPool::retire_all() {
  std::erase_if(retired_, [](const auto& weak) { return weak.expired(); });
  for (auto& [name, entry] : entries_) {
    for (auto& c : entry.connections) {
      c->retire();
      retired_.push_back(c);
    }
    entry.connections.clear();
  }
}

void HboneClientPool::shutdown() {
  retire_all();
  for (auto& weak : retired_)
    if (auto c = weak.lock()) c->shutdown();
  retired_.clear();
  for (auto& [name, entry] : entries_) entry.waiting.clear();
}

void HboneClientPool::open(const ServiceConfig& service, std::shared_ptr<TunnelStream> stream) {
  Entry& entry = entries_[service.name];
  entry.service = service;
  // Least-loaded tunnel that still has room.
  H2Connection* best = nullptr;
  for (auto& c : entry.connections) {
    if (c->accepting_streams() && (!best || c->stream_count() < best->stream_count()))
      best = c.get();
  }
  if (best && best->submit_connect(service.authority, stream)) return;
  entry.waiting.push_back({service.authority, std::move(stream)});
  if (!entry.dialing) dial(service);
}

void HboneClientPool::dial(const ServiceConfig& service) {
  if (!tls_) {
    for (auto& w : entries_[service.name].waiting) w.stream->fail("no_identity");
    entries_[service.name].waiting.clear();
    return;
  }
  entries_[service.name].dialing = true;
  auto dialer = std::make_shared<Dialer>(
      io_, service, tls_, config_.connect_timeout, metrics_,
      [this, alive = alive_, name = service.name, max = config_.max_streams,
       idle = config_.idle_timeout](std::unique_ptr<H2Connection::Tls> tls, std::string peer,
                                    std::string error) {
        if (!*alive) return;
        std::shared_ptr<H2Connection> conn;
        if (tls) {
          H2Connection::Hooks hooks;
          hooks.on_closed = [this, alive](H2Connection* c) {
            if (*alive) remove(c);
          };
          H2Connection::Settings settings;
          settings.max_concurrent_streams = max;
          settings.idle_timeout = idle;
          conn =
              std::make_shared<H2Connection>(H2Connection::Role::client, std::move(tls),
                                             std::move(peer), metrics_, std::move(hooks), settings);
          conn->start();
        }
        on_dialed(name, std::move(conn), error);
      });
  std::erase_if(dialers_, [](const auto& w) { return w.expired(); });
  dialers_.push_back(dialer);
  dialer->start();
}

void HboneClientPool::on_dialed(const std::string& service, std::shared_ptr<H2Connection> conn,
                                const std::string& error) {
  Entry& entry = entries_[service];
  entry.dialing = false;
  if (!conn) {
    metrics_.upstream_connect_failures.inc();
    auto waiting = std::move(entry.waiting);
    entry.waiting.clear();
    for (auto& w : waiting) w.stream->fail("upstream_connect_failed: " + error);
    return;
  }
  spdlog::debug("hbone: tunnel to service '{}' up, peer {}", service, conn->peer_identity());
  entry.connections.push_back(conn);
  while (!entry.waiting.empty()) {
    Waiter& w = entry.waiting.front();
    if (!conn->submit_connect(w.authority, w.stream)) break;
    entry.waiting.pop_front();
  }
  if (!entry.waiting.empty()) dial(entry.service);  // this tunnel is full: open another
}

void HboneClientPool::remove(H2Connection* conn) {
  for (auto& [name, entry] : entries_) {
    auto& v = entry.connections;
    v.erase(std::remove_if(v.begin(), v.end(), [&](const auto& c) { return c.get() == conn; }),
            v.end());
  }
}

}  // namespace weft
