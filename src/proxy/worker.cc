#include "proxy/worker.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "identity/spiffe_id.h"
#include "proxy/capture/capture.h"
#include "proxy/l4/splice_relay.h"
#include "proxy/policy/connect_policy.h"
#include "transport/hbone/h2_connection.h"
#include "transport/hbone/tunnel_stream.h"

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

std::string expected_principal(const ServiceConfig& s) {
  return s.spiffe_ids.size() == 1 ? s.spiffe_ids.front() : "unknown";
}

// Connects `socket` to `target` (an IP literal or a name) and calls done(error_code).
template <class Done>
void connect_to(asio::io_context& io, tcp::socket& socket, const HostPort& target, Done done) {
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(target.host, ec);
  if (!ec) {
    socket.async_connect(tcp::endpoint(ip, target.port), std::move(done));
    return;
  }
  auto resolver = std::make_shared<tcp::resolver>(io);
  resolver->async_resolve(
      target.host, std::to_string(target.port),
      [resolver, &socket, done = std::move(done)](const boost::system::error_code& ec,
                                                  tcp::resolver::results_type r) mutable {
        if (ec) return done(ec);
        asio::async_connect(socket, r,
                            [done = std::move(done)](const boost::system::error_code& ec,
                                                     const tcp::endpoint&) mutable { done(ec); });
      });
}

}  // namespace

Worker::Worker(unsigned index, Metrics& metrics, AccessLog& access_log)
    : index_(index),
      metrics_(metrics),
      access_log_(access_log),
      io_(1),
      pool_(io_, metrics),
      http_pool_(io_,
                 [this](const Cluster& c, int ep, std::shared_ptr<UpstreamConn> conn,
                        UpstreamPool::Opened done) {
                   dial_http_upstream(c, ep, std::move(conn), std::move(done));
                 }),
      http_env_{io_, http_pool_, metrics, access_log, {}, std::mt19937_64(std::random_device{}()),
                {},  64,         false,   nullptr} {}

Worker::~Worker() { stop_and_join(); }

void Worker::start() {
  thread_ = std::thread([this] {
    auto guard = asio::make_work_guard(io_);
    io_.run();
  });
}

void Worker::stop_and_join() {
  io_.stop();
  if (thread_.joinable()) thread_.join();
  auto pending = std::move(handshaking_);
  handshaking_.clear();
  for (TlsSocket* t : pending) t->abandon_handshake();
  // A drain that hit its deadline leaves tunnels with open streams: close them now (the
  // thread is gone, so nothing else touches them).
  if (health_) health_->stop();
  http_pool_.clear();
  pool_.shutdown();
  auto inbound = std::move(inbound_);
  inbound_.clear();
  for (auto& [raw, weak] : inbound)
    if (auto c = weak.lock()) c->shutdown();
}

void Worker::post_snapshot(SnapshotPtr snapshot) {
  asio::post(io_, [this, snapshot = std::move(snapshot)] {
    snapshot_ = snapshot;
    http_env_.current = snapshot;
    pool_.update(snapshot_->tls, snapshot_->config->pool);
    // Health checks run once per process, on the first worker.
    if (index_ == 0 && !draining_) {
      if (!health_) health_ = std::make_shared<HealthChecker>(io_, http_pool_);
      health_->update(snapshot_->http);
    }
  });
}

void Worker::post_listener(const std::string& key, std::shared_ptr<Listener> listener) {
  asio::post(io_, [this, key, listener = std::move(listener)] {
    if (draining_) return listener->close();
    listeners_[key] = listener;
    listener->start([this, key](tcp::socket s) { on_accept(key, std::move(s)); });
  });
}

void Worker::post_close_listener(const std::string& key) {
  asio::post(io_, [this, key] {
    if (auto it = listeners_.find(key); it != listeners_.end()) {
      it->second->close();
      listeners_.erase(it);
    }
  });
}

void Worker::post_drain() {
  asio::post(io_, [this] {
    draining_ = true;
    http_env_.draining = true;
    for (auto& weak : std::exchange(http_env_.live, {}))
      if (auto c = weak.lock()) c->drain();
    for (auto& [key, l] : listeners_) l->close();
    listeners_.clear();
    if (health_) health_->stop();
    http_pool_.clear();
    pool_.retire_all();
    for (auto& [raw, weak] : inbound_)
      if (auto c = weak.lock()) c->retire();
  });
}

void Worker::on_accept(const std::string& key, tcp::socket socket) {
  metrics_.downstream_connections_total.inc();
  if (!snapshot_) return;
  if (key == "inbound") return handle_inbound(std::move(socket));
  if (key.rfind("outbound/", 0) == 0) return handle_outbound(key.substr(9), std::move(socket));
  if (key.rfind("l4/", 0) == 0) return handle_l4(key.substr(3), std::move(socket));
  if (key == "capture/transparent") return handle_transparent(std::move(socket));
  if (key == "capture/explicit") return handle_explicit(std::move(socket));
  if (key == "capture/inbound") return handle_inbound_capture(std::move(socket));
}

void Worker::handle_outbound(const std::string& name, tcp::socket socket) {
  const auto& cfg = *snapshot_->config;
  const OutboundListenerConfig* listener = nullptr;
  for (const auto& o : cfg.outbound)
    if (o.name == name) listener = &o;
  const ServiceConfig* service = listener ? cfg.find_service(listener->service) : nullptr;
  if (!listener || !snapshot_->tls) return;  // removed by a reload a moment ago: just close
  if (listener->http) return serve_http(*listener, std::move(socket));
  if (!service) return;

  AccessLogEntry entry;
  entry.direction = "outbound";
  entry.listener = name;
  entry.downstream = remote_of(socket);
  open_mesh(*service, std::move(socket), std::move(entry));
}

// HTTP/1.1 or prior-knowledge HTTP/2, told apart by the first bytes (HTTP is client-first, so
// waiting for them stalls nobody). A client silent past the deadline gets the HTTP/1.1 session,
// whose idle timer closes it.
void Worker::serve_http(const OutboundListenerConfig& listener, tcp::socket socket) {
  serve_http(snapshot_, HttpListenerView::outbound(listener), std::move(socket));
}

void Worker::serve_http(const SnapshotPtr& snapshot, HttpListenerView view, ByteStream stream) {
  constexpr auto kWait = std::chrono::seconds(10);
  constexpr size_t kEnough = 24;  // the HTTP/2 preface
  if (auto pipe = stream.pipe()) {
    // An inbound HBONE stream: its bytes are looked at in the pipe, where they stay.
    struct Peek {
      Peek(asio::io_context& io, ByteStream s) : stream(std::move(s)), deadline(io) {}
      ByteStream stream;
      asio::steady_timer deadline;
      bool done = false;
    };
    auto st = std::make_shared<Peek>(io_, std::move(stream));
    auto step = std::make_shared<std::function<void(bool)>>();
    *step = [this, st, pipe, snap = snapshot, view = std::move(view),
             weak = std::weak_ptr<std::function<void(bool)>>(step)](bool final) mutable {
      if (st->done) return;
      const std::string_view bytes = pipe->buffered();
      final = final || pipe->input_ended() || bytes.size() >= kEnough;
      if (match_h2_preface(bytes) == PrefaceMatch::partial && !final) {
        pipe->async_wait_readable([weak](const boost::system::error_code& ec, size_t) {
          if (auto s = weak.lock()) (*s)(ec && ec != asio::error::operation_aborted);
        });
        return;
      }
      st->done = true;
      st->deadline.cancel();
      start_http_session(snap, std::move(view), std::move(st->stream), bytes);
    };
    st->deadline.expires_after(kWait);
    st->deadline.async_wait([st, pipe, step](const boost::system::error_code& ec) {
      if (ec || st->done) return;
      pipe->cancel();
      (*step)(true);
    });
    (*step)(false);
    return;
  }
  auto held = std::make_shared<ByteStream>(std::move(stream));
  peek_until(held->tcp(), kWait, kEnough,
             [this, held, snap = snapshot, view = std::move(view)](std::string_view bytes,
                                                                   bool final) mutable {
               if (match_h2_preface(bytes) == PrefaceMatch::partial && !final) return false;
               start_http_session(snap, std::move(view), std::move(*held), bytes);
               return true;
             });
}

// HTTP/1.1 or prior-knowledge HTTP/2, told by the first bytes (which are left in the stream).
void Worker::start_http_session(const SnapshotPtr& snapshot, HttpListenerView view,
                                ByteStream stream, std::string_view first_bytes) {
  if (match_h2_preface(first_bytes) == PrefaceMatch::yes)
    std::make_shared<H2Downstream>(http_env_, snapshot, std::move(view), std::move(stream))
        ->start();
  else
    std::make_shared<HttpSession>(http_env_, snapshot, std::move(view), std::move(stream))->start();
}

void Worker::open_mesh(const ServiceConfig& service_ref, tcp::socket socket, AccessLogEntry entry,
                       std::string prefix) {
  const ServiceConfig* service = &service_ref;
  entry.local_identity = snapshot_->tls->spiffe_id;
  entry.upstream = service->name;
  entry.authority = service->authority;
  auto counters = metrics_.tcp({"source", snapshot_->tls->spiffe_id, expected_principal(*service),
                                service->authority, "mutual_tls"});
  auto stream = std::make_shared<TunnelStream>(
      std::move(socket), std::move(counters), true, metrics_,
      [this, entry = std::move(entry)](const TunnelStream& s, const std::string& result) mutable {
        entry.peer_identity = s.peer_identity();
        entry.bytes_received = s.bytes_from_tcp();
        entry.bytes_sent = s.bytes_to_tcp();
        entry.result = result;
        access_log_.write(entry);
      });
  stream->set_prefix(std::move(prefix));
  pool_.open(*service, std::move(stream));
}

void Worker::dial_http_upstream(const Cluster& c, int ep, std::shared_ptr<UpstreamConn> conn,
                                UpstreamPool::Opened done) {
  const EndpointConfig& e = c.endpoints()[ep].config;
  if (e.direct) {
    auto* socket = &conn->socket.tcp();
    connect_to(io_, *socket, e.address,
               [this, conn = std::move(conn),
                done = std::move(done)](const boost::system::error_code& ec) mutable {
                 if (ec) {
                   metrics_.upstream_connect_failures.inc();
                   return done(nullptr, "connect: " + ec.message());
                 }
                 boost::system::error_code ignored;
                 conn->socket.tcp().set_option(tcp::no_delay(true), ignored);
                 done(std::move(conn), "");
               });
    return;
  }
  // The HTTP code reads and writes the pipe; the tunnel moves its bytes into the HBONE stream.
  auto pipe = std::make_shared<TunnelPipe>(io_.get_executor());
  conn->socket = ByteStream(pipe);
  // One pool entry per (service, proxy address): tunnels to a proxy carry streams for all of
  // the service's endpoints behind it, each CONNECT naming its own target.
  ServiceConfig s = c.service();
  s.name += "@" + e.address.to_string();
  s.addresses = {e.address};
  s.authority = e.authority;
  auto stream =
      std::make_shared<TunnelStream>(std::move(pipe), std::make_shared<TcpCounters>(), true,
                                     metrics_, [](const TunnelStream&, const std::string&) {});
  std::weak_ptr<TunnelStream> weak = stream;
  stream->set_on_open(
      [conn = std::move(conn), done = std::move(done), weak](const std::string& failure) mutable {
        if (!failure.empty()) return done(nullptr, failure);
        if (auto s = weak.lock()) conn->peer_identity = s->peer_identity();
        done(std::move(conn), "");
      });
  pool_.open(s, std::move(stream));
}

void Worker::handle_inbound(tcp::socket socket) {
  if (!snapshot_->tls) return;
  const std::string downstream = remote_of(socket);
  auto tls = std::make_unique<TlsSocket>(std::move(socket), snapshot_->tls->server->native_handle(),
                                         TlsSocket::Role::server);
  auto* raw = tls.get();
  handshaking_.insert(raw);
  // A peer that connects and says nothing must not hold a slot forever.
  auto timer = std::make_shared<asio::steady_timer>(io_, snapshot_->config->pool.connect_timeout);
  timer->async_wait([raw](const boost::system::error_code& ec) {
    if (!ec) raw->close();
  });
  raw->async_handshake([this, holder = std::make_shared<std::unique_ptr<TlsSocket>>(std::move(tls)),
                        timer, downstream](const boost::system::error_code& ec) mutable {
    timer->cancel();
    auto tls = std::move(*holder);
    handshaking_.erase(tls.get());
    if (ec) {
      metrics_.tls_handshake_errors.inc();
      AccessLogEntry entry;
      entry.direction = "inbound";
      entry.listener = "inbound";
      entry.downstream = downstream;
      entry.result =
          "tls_handshake_failed: " + (tls->error().empty() ? ec.message() : tls->error());
      access_log_.write(entry);
      return;
    }
    auto peer = peer_spiffe_id(tls->native_handle());
    auto td = peer ? spiffe_trust_domain(*peer) : Result<std::string>(make_error("none"));
    if (!peer || !td || *td != snapshot_->tls->trust_domain) {
      metrics_.tls_handshake_errors.inc();
      AccessLogEntry entry;
      entry.direction = "inbound";
      entry.listener = "inbound";
      entry.downstream = downstream;
      entry.peer_identity = peer.value_or("");
      entry.result = "peer_identity_rejected: certificate has no SPIFFE ID of trust domain " +
                     snapshot_->tls->trust_domain;
      access_log_.write(entry);
      tls->close();
      return;
    }
    start_inbound_tunnel(std::move(tls), *peer, downstream);
  });
}

void Worker::start_inbound_tunnel(std::unique_ptr<TlsSocket> tls, const std::string& peer,
                                  const std::string& downstream) {
  H2Connection::Hooks hooks;
  hooks.on_closed = [this](H2Connection* c) { inbound_.erase(c); };
  hooks.on_connect = [this, peer, downstream](const std::shared_ptr<H2Connection>&, int32_t,
                                              const std::string& authority) {
    const auto snap = snapshot_;
    const auto verdict = authorize_connect(*snap->config, snap->tls->trust_domain, authority, peer);
    AccessLogEntry entry;
    entry.direction = "inbound";
    entry.listener = "inbound";
    entry.downstream = downstream;
    entry.peer_identity = peer;
    entry.local_identity = snap->tls->spiffe_id;
    entry.authority = authority;
    if (verdict.status != 0) {
      entry.result = verdict.reason;
      access_log_.write(entry);
      return H2Connection::ConnectDecision{verdict.status, nullptr};
    }
    if (verdict.target->http)
      return accept_http_stream(snap, *verdict.target, peer, std::move(entry));
    const HostPort target = verdict.target->address;
    entry.upstream = target.to_string();
    auto counters =
        metrics_.tcp({"destination", peer, snap->tls->spiffe_id, authority, "mutual_tls"});
    auto stream = std::make_shared<TunnelStream>(
        tcp::socket(io_), std::move(counters), false, metrics_,
        [this, entry = std::move(entry)](const TunnelStream& s, const std::string& result) mutable {
          entry.bytes_received = s.bytes_to_tcp();
          entry.bytes_sent = s.bytes_from_tcp();
          entry.result = result;
          access_log_.write(entry);
        });
    connect_to(io_, stream->socket(), target, [this, stream](const boost::system::error_code& ec) {
      if (ec) {
        metrics_.upstream_connect_failures.inc();
        if (auto c = stream->connection()) c->reject_stream(stream->stream_id(), 503);
        // No reset: it would overtake the 503 and the client would only see a broken stream.
        stream->fail("upstream_connect_failed: " + ec.message(), false);
        return;
      }
      boost::system::error_code ignored;
      stream->socket().set_option(tcp::no_delay(true), ignored);
      if (auto c = stream->connection()) c->accept_stream(stream->stream_id());
      stream->start_relay();
    });
    return H2Connection::ConnectDecision{0, stream};
  };
  H2Connection::Settings settings;
  settings.max_concurrent_streams = 1000;
  // Longer than any sane client pool idle timeout, so the client always closes first and never
  // races a server-side close with a new stream; still frees tunnels that clients abandoned.
  settings.idle_timeout = std::chrono::minutes(10);
  auto conn = std::make_shared<H2Connection>(H2Connection::Role::server, std::move(tls), peer,
                                             metrics_, std::move(hooks), settings);
  inbound_[conn.get()] = conn;
  if (draining_) conn->retire();
  conn->start();
}

// An inbound CONNECT to a `protocol: http` target: the stream is accepted at once and its bytes
// go through a TunnelPipe to an HttpSession (HTTP/1.1) or an H2Downstream (HTTP/2), which
// check each request (HMAC, authorization, rate limit) and forward it to the app over pooled
// connections.
H2Connection::ConnectDecision Worker::accept_http_stream(const SnapshotPtr& snap,
                                                         const InboundTargetConfig& target,
                                                         const std::string& peer,
                                                         AccessLogEntry entry) {
  const InboundHttp* state = snap->http->inbound(target.authority);
  if (!state) {
    entry.result = "internal_error: no http state for the target";
    access_log_.write(entry);
    return H2Connection::ConnectDecision{503, nullptr};
  }
  entry.upstream = target.address.to_string();
  entry.protocol = "http";
  const std::string downstream_ip = entry.downstream.substr(0, entry.downstream.rfind(':'));
  auto counters =
      metrics_.tcp({"destination", peer, snap->tls->spiffe_id, target.authority, "mutual_tls"});
  auto pipe = std::make_shared<TunnelPipe>(io_.get_executor());
  auto stream = std::make_shared<TunnelStream>(
      pipe, std::move(counters), false, metrics_,
      [this, entry = std::move(entry)](const TunnelStream& s, const std::string& result) mutable {
        entry.bytes_received = s.bytes_to_tcp();
        entry.bytes_sent = s.bytes_from_tcp();
        entry.result = result;
        access_log_.write(entry);
      });
  HttpListenerView view{target.authority, &state->routes, target.max_request_body,
                        &target,          state,          peer,
                        downstream_ip,    "http/1.1"};
  // The peer proxy sends HTTP/1.1 or, for a stream it forwards as HTTP/2, the HTTP/2 preface.
  serve_http(snap, std::move(view), ByteStream(std::move(pipe)));
  // Answered after this returns, once the stream is attached.
  asio::post(io_, [stream] {
    if (auto c = stream->connection()) {
      c->accept_stream(stream->stream_id());
      stream->start_relay();
    }
  });
  return H2Connection::ConnectDecision{0, stream};
}

void Worker::handle_l4(const std::string& name, tcp::socket socket) {
  const L4ListenerConfig* l4 = nullptr;
  for (const auto& l : snapshot_->config->l4)
    if (l.name == name) l4 = &l;
  if (!l4) return;
  AccessLogEntry entry;
  entry.direction = "l4";
  entry.listener = name;
  entry.downstream = remote_of(socket);
  open_egress(l4->upstream, std::move(socket), std::move(entry), nullptr);
}

void Worker::open_egress(const HostPort& target, tcp::socket socket, AccessLogEntry entry,
                         Ready ready, std::string prefix) {
  entry.upstream = target.to_string();
  auto upstream = std::make_shared<tcp::socket>(io_);
  auto downstream = std::make_shared<tcp::socket>(std::move(socket));
  connect_to(io_, *upstream, target,
             [this, upstream, downstream, ready = std::move(ready), prefix = std::move(prefix),
              entry = std::move(entry)](const boost::system::error_code& ec) mutable {
               if (ec) {
                 metrics_.upstream_connect_failures.inc();
                 entry.result = "upstream_connect_failed: " + ec.message();
                 access_log_.write(entry);
                 if (ready) ready(*downstream, entry.result);
                 return;  // closing the downstream tells the client
               }
               if (ready) ready(*downstream, "");
               boost::system::error_code ignored;
               // A fresh connection's empty send buffer takes a request head at once.
               if (!prefix.empty()) asio::write(*upstream, asio::buffer(prefix), ignored);
               upstream->set_option(tcp::no_delay(true), ignored);
               auto counters = metrics_.tcp({"destination", "", "", entry.upstream, "none"});
               auto relay = std::make_shared<SpliceRelay>(
                   std::move(*downstream), std::move(*upstream), std::move(counters), metrics_,
                   [this, entry = std::move(entry)](const SpliceRelay& r,
                                                    const std::string& result) mutable {
                     entry.bytes_received = r.bytes_received();
                     entry.bytes_sent = r.bytes_sent();
                     entry.result = result;
                     access_log_.write(entry);
                   });
               relay->start();
             });
}

}  // namespace weft
