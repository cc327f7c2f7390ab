#include "proxy/http/http_session.h"

#include <spdlog/spdlog.h>

#include <boost/asio/write.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/rfc7230.hpp>
#include <boost/beast/http/write.hpp>

#include "identity/spiffe_id.h"
#include "proxy/http/hmac_signing.h"
#include "proxy/http/request_policy.h"
#include "proxy/http/router.h"

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

constexpr auto kDownstreamIdle = std::chrono::minutes(5);

bool idempotent(http::verb v) {
  switch (v) {
    case http::verb::get:
    case http::verb::head:
    case http::verb::options:
    case http::verb::put:
    case http::verb::delete_:
    case http::verb::trace:
      return true;
    default:
      return false;
  }
}

bool is_lower_hex(std::string_view s) {
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

std::string hex(uint64_t v, int digits) {
  static const char* d = "0123456789abcdef";
  std::string out(static_cast<size_t>(digits), '0');
  for (int i = digits - 1; i >= 0; --i, v >>= 4) out[static_cast<size_t>(i)] = d[v & 15];
  return out;
}

// Hop-by-hop headers (RFC 9110 7.6.1) are the connection's, not the message's.
template <class Fields>
void strip_hop_by_hop(Fields& f) {
  std::vector<std::string> named;
  for (const auto& token : http::token_list(f[http::field::connection])) named.emplace_back(token);
  for (const auto& n : named) f.erase(n);
  f.erase(http::field::connection);
  f.erase(http::field::keep_alive);
  f.erase(http::field::proxy_connection);
  f.erase(http::field::te);
  f.erase(http::field::upgrade);
}

template <class Fields>
void rewrite(Fields& f, const HeaderRewrite& r) {
  for (const auto& name : r.remove) f.erase(name);
  for (const auto& [name, value] : r.add) f.set(name, value);
}

}  // namespace

std::string next_traceparent(std::string_view in, uint64_t r1, uint64_t r2, uint64_t r3,
                             std::string* trace_id) {
  // version "00": 00-<32 hex trace>-<16 hex parent>-<2 hex flags>; all-zero IDs are invalid.
  constexpr std::string_view kZeros = "00000000000000000000000000000000";
  const bool valid = in.size() == 55 && in.substr(0, 3) == "00-" && in[35] == '-' &&
                     in[52] == '-' && is_lower_hex(in.substr(3, 32)) &&
                     is_lower_hex(in.substr(36, 16)) && is_lower_hex(in.substr(53, 2)) &&
                     in.substr(3, 32) != kZeros && in.substr(36, 16) != kZeros.substr(16);
  // Written in place: this runs for every request, and the pieces as strings cost 8 mallocs.
  std::string out = "00-";
  out.resize(55, '-');
  const auto put_hex = [&out](size_t at, uint64_t v) {
    for (int i = 15; i >= 0; --i, v >>= 4) out[at + i] = "0123456789abcdef"[v & 15];
  };
  if (valid) {
    out.replace(3, 32, in.substr(3, 32));
    out.replace(53, 2, in.substr(53, 2));
  } else {
    put_hex(3, r1);
    put_hex(19, r2 | 1);
    out.replace(53, 2, "01");
  }
  put_hex(36, r3 | 1);
  if (trace_id) trace_id->assign(out, 3, 32);
  return out;
}

HttpSession::HttpSession(HttpWorkerEnv& env, SnapshotPtr snapshot, HttpListenerView listener,
                         ByteStream downstream)
    : env_(env),
      snap_(std::move(snapshot)),
      listener_(std::move(listener)),
      down_(std::move(downstream)),
      timer_(env.io),
      backoff_(env.io),
      try_timer_(env.io) {
  source_ip_ = listener_.downstream.empty() ? down_.remote_ip() : listener_.downstream;
  boost::system::error_code ignored;
  if (!down_.pipe()) down_.tcp().set_option(tcp::no_delay(true), ignored);
}

HttpSession::~HttpSession() {
  if (counted_) env_.metrics.downstream_connections_active.dec();
}

void HttpSession::start() {
  counted_ = listener_.downstream.empty();
  if (counted_) env_.metrics.downstream_connections_active.inc();
  env_.track(weak_from_this());
  read_request();
}

void HttpSession::drain() {
  // A request under way is answered with Connection: close (unless its header left already:
  // then the grace below applies once it is done). An idle connection gets a moment for a
  // request already on its way, then is closed.
  if (!idle_) {
    if (!response_started_) down_keep_alive_ = false;
    return;
  }
  timer_.expires_after(kDrainIdleGrace);
  timer_.async_wait(
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
        if (!ec && g == self->generation_ && self->idle_) self->close();
      });
}

void HttpSession::read_request() {
  ++generation_;
  parser_.emplace();
  parser_->header_limit(64 * 1024);
  parser_->body_limit(listener_.max_request_body);
  route_ = nullptr;
  cluster_ = nullptr;
  attempts_ = 0;
  h2_refusals_ = 0;
  endpoint_ = last_endpoint_ = -1;
  tried_ = 0;
  response_started_ = false;
  timed_out_ = false;
  resp_bytes_ = 0;
  req_bytes_ = 0;
  resp_.reset();
  ser_.reset();
  entry_ = AccessLogEntry{};
  entry_.direction = listener_.inbound ? "inbound" : "outbound";
  entry_.listener = listener_.name;
  entry_.downstream = source_ip_;
  entry_.protocol = listener_.protocol;
  if (listener_.inbound) entry_.peer_identity = listener_.peer_identity;
  started_ = std::chrono::steady_clock::now();
  idle_ = true;
  // A keep-alive connection that stays quiet is closed; so is one that trickles a header.
  timer_.expires_after(env_.draining ? std::chrono::seconds(kDrainIdleGrace)
                                     : std::chrono::seconds(kDownstreamIdle));
  timer_.async_wait(
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
        if (!ec && g == self->generation_) self->close();
      });
  http::async_read_header(down_, down_buf_, *parser_,
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      size_t n) { self->on_header(ec, n); });
}

void HttpSession::on_header(const boost::system::error_code& ec, size_t n) {
  idle_ = false;
  if (ec) return on_parse_error(ec);
  req_bytes_ += n;
  started_ = std::chrono::steady_clock::now();
  auto& msg = parser_->get();
  entry_.method = std::string(msg.method_string());
  entry_.path = std::string(msg.target());
  entry_.host = normalize_host(msg[http::field::host]);
  if (auto len = parser_->content_length(); len && *len > listener_.max_request_body)
    return local_reply(413,
                       "request body of " + std::to_string(*len) +
                           " bytes is over this listener's "
                           "max_request_body (" +
                           std::to_string(listener_.max_request_body) + ")\n",
                       "-", {}, true);
  if (beast::iequals(msg[http::field::expect], "100-continue")) {
    msg.erase(http::field::expect);
    static const char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";
    boost::system::error_code wec;
    asio::write(down_, asio::buffer(kContinue, sizeof kContinue - 1), wec);
    if (wec) return close();
  }
  if (parser_->is_done()) return on_body({}, 0);
  http::async_read(down_, down_buf_, *parser_,
                   [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                     self->on_body(ec, n);
                   });
}

void HttpSession::on_parse_error(const boost::system::error_code& ec) {
  if (ec == http::error::end_of_stream || ec == asio::error::eof ||
      ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
      ec.category() != make_error_code(http::error::end_of_stream).category())
    return close();
  if (ec == http::error::body_limit)
    return local_reply(413,
                       "request body is over this listener's max_request_body (" +
                           std::to_string(listener_.max_request_body) + " bytes)\n",
                       "-", {}, true);
  if (ec == http::error::header_limit)
    return local_reply(431, "request header over 64 KiB\n", "-", {}, true);
  local_reply(400, "bad request: " + ec.message() + "\n", "-", {}, true);
}

void HttpSession::on_body(const boost::system::error_code& ec, size_t n) {
  if (ec) return on_parse_error(ec);
  req_bytes_ += n;
  req_ = parser_->release();
  handle_request();
}

void HttpSession::handle_request() {
  const std::string_view target = req_.target();
  const std::string_view path = target.substr(0, target.find('?'));
  down_keep_alive_ = req_.keep_alive() && !env_.draining;
  if (snap_->tls) entry_.local_identity = snap_->tls->spiffe_id;

  std::string traceparent =
      next_traceparent(req_["traceparent"], env_.rng(), env_.rng(), env_.rng(), &entry_.trace_id);
  // An upgrade (WebSocket): forwarded with its Upgrade header; a 101 turns the connection
  // into a byte tunnel. Only GET upgrades (RFC 6455); h2c upgrades are not passed on.
  upgrade_.clear();
  if (auto u = req_.find(http::field::upgrade); u != req_.end()) {
    if (req_.method() != http::verb::get || beast::iequals(u->value(), "h2c"))
      req_.erase(http::field::upgrade);
    else
      upgrade_ = std::string(u->value());
  }

  RequestView view;
  view.host = entry_.host;
  view.path = path;
  view.method = req_.method_string();
  view.ctx = &req_;
  view.header = [](const void* ctx, std::string_view name, std::string_view& value) {
    const auto& r = *static_cast<const Request*>(ctx);
    auto it = r.find(name);
    if (it == r.end()) return false;
    value = it->value();
    return true;
  };
  if (listener_.inbound && !admit_inbound(path)) return;
  route_ = match_route(*listener_.routes, view);
  if (!route_)
    return local_reply(404,
                       "no route for host '" + entry_.host + "' path '" + std::string(path) +
                           "' on listener " + listener_.name + "\n",
                       "NR");
  entry_.route = route_->name;

  if (auto r =
          route_rate_limited(*snap_->http, listener_.name, *route_, source_ip_, steady_now_ms()))
    return local_reply(*r);

  const auto& fault = route_->fault;
  if (fault_roll(env_.rng, fault.abort_percent))
    return local_reply(fault.abort_status, "fault injected: abort\n", "FI");

  const WeightedBackend& backend = pick_backend(*route_, env_.rng());
  cluster_ = snap_->http->cluster(backend.service);
  entry_.upstream = backend.service;
  if (!cluster_ || cluster_->endpoints().empty())
    return local_reply(503, "service '" + backend.service + "' has no endpoints\n", "UH");
  if (auto r = take_request_slot(*cluster_)) return local_reply(*r);
  counted_request_ = true;

  const auto& hash_header = cluster_->service().http.hash_header;
  hash_key_ = hash_header.empty() ? source_ip_ : std::string(req_[hash_header]);

  strip_hop_by_hop(req_);
  rewrite(req_, route_->request_headers);
  req_.set("traceparent", traceparent);
  req_.keep_alive(true);
  if (!upgrade_.empty()) {
    req_.set(http::field::upgrade, upgrade_);
    req_.set(http::field::connection, "Upgrade");
  }
  if (req_.body().size() || req_.has_content_length()) req_.prepare_payload();

  // The route timeout covers the whole exchange, fault delay and retries included.
  timer_.expires_after(route_->timeout);
  timer_.async_wait(
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
        if (!ec && g == self->generation_) self->on_timeout();
      });
  if (fault_roll(env_.rng, fault.delay_percent)) {
    backoff_.expires_after(fault.delay);
    backoff_.async_wait(
        [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
          if (!ec && g == self->generation_) self->attempt();
        });
    entry_.response_flags = "DI";
    return;
  }
  attempt();
}

void HttpSession::attempt() {
  ++attempts_;
  ++try_seq_;
  if (route_->retries.per_try_timeout.count() > 0) {
    try_timer_.expires_after(route_->retries.per_try_timeout);
    try_timer_.async_wait([self = shared_from_this(), g = generation_,
                           a = try_seq_](const boost::system::error_code& ec) {
      if (!ec && g == self->generation_ && a == self->try_seq_ && !self->timed_out_ &&
          !self->response_started_)
        self->on_try_timeout();
    });
  }
  const SteadyMillis now = steady_now_ms();
  endpoint_ = cluster_->pick_untried(hash_key_, last_endpoint_, env_.rng, now, tried_);
  if (endpoint_ < 0) return local_reply(503, "no endpoint\n", "UH");
  cluster_->endpoints()[endpoint_].state->active_requests.fetch_add(1, std::memory_order_relaxed);
  endpoint_counted_ = true;
  if (cluster_->service().http.h2) {
    // (After a refusal, a new connection: see H2Forward::attempt.)
    if (h2_refusals_ == 0)
      if (auto up = env_.pool.take_h2(*cluster_, endpoint_)) return send_h2(std::move(up), false);
  } else if (auto conn = env_.pool.take_idle(*cluster_, endpoint_)) {
    up_ = std::move(conn);
    return send_request();
  }
  open_upstream();
}

void HttpSession::open_upstream() {
  if (cluster_->service().http.h2) return open_h2();
  if (auto r = take_connection_slot(*cluster_)) {
    end_attempt();
    return local_reply(*r);
  }
  env_.pool.open(*cluster_, endpoint_,
                 [self = shared_from_this(), g = generation_, a = try_seq_,
                  breakers = cluster_->breakers_ptr()](std::shared_ptr<UpstreamConn> conn,
                                                       const std::string& failure) {
                   breakers->pending.fetch_sub(1, std::memory_order_relaxed);
                   if (g != self->generation_ || a != self->try_seq_ || self->timed_out_) return;
                   self->on_connected(std::move(conn), failure);
                 });
}

void HttpSession::on_connected(std::shared_ptr<UpstreamConn> conn, const std::string& failure) {
  if (!conn || !failure.empty())
    return attempt_failed(Failure::connect, failure, may_retry(Failure::connect));
  up_ = std::move(conn);
  send_request();
}

void HttpSession::send_request() {
  if (!listener_.inbound) entry_.peer_identity = up_->peer_identity;
  entry_.authority = cluster_->endpoints()[endpoint_].config.authority;
  sign_request();
  http::async_write(
      up_->socket, req_,
      [self = shared_from_this(), g = generation_, a = try_seq_, conn = up_](
          const boost::system::error_code& ec, size_t) {
        if (g != self->generation_ || a != self->try_seq_ || self->timed_out_) return;
        if (ec)
          return self->attempt_failed(Failure::reset, "write: " + ec.message(),
                                      self->may_retry(Failure::reset));
        self->resp_ = std::make_shared<ResponseParser>();
        self->resp_->body_limit(boost::none);
        if (self->req_.method() == http::verb::head) self->resp_->skip(true);
        http::async_read_header(
            conn->socket, conn->buffer, *self->resp_,
            [self, g, a, conn, parser = self->resp_](const boost::system::error_code& ec, size_t) {
              if (g != self->generation_ || a != self->try_seq_ || self->timed_out_) return;
              self->on_response_header(ec);
            });
      });
}

// After a 101: both directions copy bytes until each side has closed its sending half; bytes
// already read past the request or the 101 go first. One access-log line when both are done.
void HttpSession::start_tunnel() {
  struct Direction {
    ByteStream* from;
    ByteStream* to;
    std::vector<char> buf = std::vector<char>(16 * 1024);
    std::string pending;
    uint64_t bytes = 0;
  };
  struct Tunnel {
    Direction up, down;  // client -> app, app -> client
    int open = 2;
  };
  auto t = std::make_shared<Tunnel>();
  t->up.from = &down_;
  t->up.to = &up_->socket;
  t->down.from = &up_->socket;
  t->down.to = &down_;
  t->up.pending.assign(static_cast<const char*>(down_buf_.data().data()), down_buf_.size());
  down_buf_.consume(down_buf_.size());
  t->down.pending.assign(static_cast<const char*>(up_->buffer.data().data()), up_->buffer.size());
  up_->buffer.consume(up_->buffer.size());
  auto self = shared_from_this();
  auto conn = up_;
  // EOF passes the half-close on; an error (a reset) ends both directions.
  auto done_one = [self, t, conn](Direction& d, const boost::system::error_code& ec) {
    d.to->shutdown_send();
    if (ec && ec != asio::error::eof) {
      self->down_.cancel();
      conn->socket.cancel();
    }
    if (--t->open == 0) {
      self->req_bytes_ += t->up.bytes;
      self->resp_bytes_ += t->down.bytes;
      self->finish_request(101, "-", "upgraded_connection_closed");
      self->close();
    }
  };
  // Each direction: write what is pending, read more, repeat; EOF or an error ends it.
  // The pump holds itself only through pending handlers, so it is freed when both end.
  auto pump = std::make_shared<std::function<void(Direction*)>>();
  *pump = [self, t, conn, done_one,
           weak = std::weak_ptr<std::function<void(Direction*)>>(pump)](Direction* d) {
    auto run = weak.lock();
    if (!d->pending.empty()) {
      asio::async_write(
          *d->to, asio::buffer(d->pending),
          [self, t, conn, done_one, run, d](const boost::system::error_code& ec, size_t n) {
            d->bytes += n;
            d->pending.clear();
            if (ec) return done_one(*d, ec);
            (*run)(d);
          });
      return;
    }
    d->from->async_read_some(
        asio::buffer(d->buf),
        [self, t, conn, done_one, run, d](const boost::system::error_code& ec, size_t n) {
          if (ec) return done_one(*d, ec);
          d->pending.assign(d->buf.data(), n);
          (*run)(d);
        });
  };
  (*pump)(&t->up);
  (*pump)(&t->down);
}

// Each attempt is signed afresh: a retry with the first attempt's nonce would be a replay.
void HttpSession::sign_request(bool h2_stream) {
  h2_signed_body_.clear();
  const auto* service = &cluster_->service();
  if (env_.current && env_.current != snap_)
    if (const auto* newer = env_.current->config->find_service(service->name)) service = newer;
  const auto& hmac = service->http.hmac;
  if (hmac.key.empty()) return;
  // Over HTTP/2 the verifier checks the header before the body comes, so a body goes in
  // signed chunks (hmac_signing.h), as the HTTP/2 forwarder sends it.
  const bool in_chunks = h2_stream && !req_.body().empty();
  SignedRequest s{req_.method_string(), req_.target(), req_.body(), {}, in_chunks};
  for (const auto& name : hmac.signed_headers)
    s.headers.emplace_back(name, std::string(req_[name]));
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  const std::string header =
      weft::sign_request(hmac.key, s, now, hex(env_.rng(), 16) + hex(env_.rng(), 16));
  req_.set("x-weft-signature", header);
  if (!in_chunks) return;
  ChunkSigner(hmac.key, header).frame_whole(req_.body(), h2_signed_body_);
}

bool HttpSession::admit_inbound(std::string_view path) {
  const InboundTargetConfig& t = *listener_.inbound;
  if (auto r = inbound_rate_limited(listener_, steady_now_ms())) {
    local_reply(*r);
    return false;
  }
  // The keys of the newest config (a rotation reaches this open connection too).
  const InboundTargetConfig* newest = &t;
  if (env_.current && env_.current != snap_)
    if (const auto* n = env_.current->config->find_target(t.authority)) newest = n;
  if (!newest->hmac.keys.empty()) {
    if (auto r = hmac_refusal(
            listener_, *newest, req_["x-weft-signature"], req_.method_string(), req_.target(),
            req_.body(), [this](const std::string& name) { return std::string(req_[name]); },
            nullptr)) {
      local_reply(*r);
      return false;
    }
    req_.erase("x-weft-signature");
  }
  if (auto r = authorization_refusal(listener_, req_.method_string(), path)) {
    local_reply(*r);
    return false;
  }
  return true;
}

void HttpSession::on_response_header(const boost::system::error_code& ec) {
  try_timer_.cancel();
  if (ec) {
    // Nothing of a response arrived: the connection broke under the request.
    const std::string why = ec == http::error::end_of_stream || ec == asio::error::eof
                                ? std::string("upstream closed the connection")
                                : ec.message();
    return attempt_failed(Failure::reset, why, may_retry(Failure::reset));
  }
  const unsigned status = resp_->get().result_int();
  if (status >= 500 && may_retry(Failure::status_5xx)) {
    up_.reset();  // its body is unread: not reusable
    return attempt_failed(Failure::status_5xx, std::to_string(status), true);
  }
  cluster_->record(endpoint_, status >= 500, steady_now_ms());
  auto& msg = resp_->get();
  if (status == 101 && !upgrade_.empty()) {
    // Switching protocols: the 101 goes out as the app sent it, then bytes flow both ways.
    timer_.cancel();  // a WebSocket outlives the route timeout
    response_started_ = true;
    entry_.status = 101;
    auto head = std::make_shared<http::response<http::empty_body>>(static_cast<http::status>(101),
                                                                   msg.version());
    for (const auto& f : msg) head->insert(f.name_string(), f.value());
    rewrite(*head, route_->response_headers);
    http::async_write(down_, *head,
                      [self = shared_from_this(), head, g = generation_](
                          const boost::system::error_code& ec, size_t n) {
                        if (g != self->generation_) return;
                        self->resp_bytes_ += n;
                        if (ec) {
                          self->finish_request(101, "DC", "downstream_closed: " + ec.message());
                          return self->close();
                        }
                        self->start_tunnel();
                      });
    return;
  }
  strip_hop_by_hop(msg);
  rewrite(msg, route_->response_headers);
  // The downstream connection stays open only if the body's end is not marked by a close.
  if (resp_->need_eof()) down_keep_alive_ = false;
  msg.keep_alive(down_keep_alive_);
  response_started_ = true;
  entry_.status = status;
  ser_.emplace(msg);
  msg.body().data = nullptr;
  msg.body().size = 0;
  msg.body().more = !resp_->is_done();
  if (!resp_->is_done()) {
    // Read the first piece before writing the header with it: one write, usually.
    msg.body().data = body_chunk_;
    msg.body().size = sizeof body_chunk_;
    http::async_read_some(up_->socket, up_->buffer, *resp_,
                          [self = shared_from_this(), g = generation_, conn = up_, parser = resp_](
                              const boost::system::error_code& ec, size_t) {
                            if (g != self->generation_ || self->timed_out_) return;
                            auto& body = self->resp_->get().body();
                            if (ec && ec != http::error::need_buffer) {
                              self->up_.reset();
                              self->finish_request(self->entry_.status, "UR",
                                                   "upstream_reset_during_body: " + ec.message());
                              return self->close();
                            }
                            body.size = sizeof self->body_chunk_ - body.size;
                            body.data = self->body_chunk_;
                            body.more = !self->resp_->is_done();
                            self->relay_body();
                          });
    return;
  }
  relay_body();
}

// Writes what the serializer holds (header and/or a body piece), then reads the next piece.
void HttpSession::relay_body() {
  http::async_write(
      down_, *ser_,
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec, size_t n) {
        if (g != self->generation_) return;
        self->resp_bytes_ += n;
        if (ec && ec != http::error::need_buffer) {
          self->up_.reset();
          self->finish_request(self->entry_.status, "DC", "downstream_closed: " + ec.message());
          return self->close();
        }
        if (self->ser_->is_done()) {
          const bool reusable = self->resp_->keep_alive() && !self->resp_->need_eof() &&
                                self->up_ && self->up_->buffer.size() == 0;
          // (Not while draining: the pool was emptied and nothing would close it again.)
          if (reusable && !self->env_.draining) self->env_.pool.put_idle(std::move(self->up_));
          self->up_.reset();
          self->finish_request(self->entry_.status, "-", "ok");
          if (self->down_keep_alive_) return self->read_request();
          return self->close();
        }
        auto& body = self->resp_->get().body();
        if (self->resp_->is_done()) {
          body.data = nullptr;
          body.size = 0;
          body.more = false;
          return self->relay_body();
        }
        body.data = self->body_chunk_;
        body.size = sizeof self->body_chunk_;
        auto conn = self->up_;
        http::async_read(
            conn->socket, conn->buffer, *self->resp_,
            [self, g, conn, parser = self->resp_](const boost::system::error_code& ec, size_t) {
              if (g != self->generation_ || self->timed_out_) return;
              auto& body = self->resp_->get().body();
              if (ec && ec != http::error::need_buffer) {
                self->up_.reset();
                self->finish_request(self->entry_.status, "UR",
                                     "upstream_reset_during_body: " + ec.message());
                return self->close();
              }
              body.size = sizeof self->body_chunk_ - body.size;
              body.data = self->body_chunk_;
              body.more = !self->resp_->is_done();
              self->relay_body();
            });
      });
}

bool HttpSession::may_retry(Failure kind) const {
  const auto& p = route_->retries;
  // A connect failure sent nothing: any method may go again. Otherwise only idempotent ones.
  // A gRPC status the route names means the app did not do the call (gRPC's retry policy,
  // which takes any method); the whole request is still here to send again.
  if (!idempotent(req_.method()) && kind != Failure::connect && kind != Failure::grpc_status)
    return false;
  // A pooled connection the app closed just as we wrote: the request never reached it, so one
  // more try on a fresh connection is always safe (not counted against the policy).
  const bool stale_pooled = kind == Failure::reset && up_ && up_->reused && attempts_ == 1;
  if (stale_pooled) return true;
  if (attempts_ > p.attempts) return false;
  const bool wanted = (kind == Failure::connect && p.on_connect_failure) ||
                      (kind == Failure::reset && p.on_reset) ||
                      (kind == Failure::status_5xx && p.on_5xx) ||
                      (kind == Failure::try_timeout && p.on_5xx) ||
                      (kind == Failure::grpc_status && p.on_grpc != 0);
  return wanted && cluster_->retry_allowed();
}

void HttpSession::attempt_failed(Failure kind, const std::string& why, bool retry) {
  // A pooled connection the app closed under us is the keep-alive race, not the endpoint
  // failing: no outlier mark, and the retry goes at once.
  const bool stale_pooled = kind == Failure::reset && up_ && up_->reused && attempts_ == 1;
  // (A gRPC status is recorded by whoever read it: only UNAVAILABLE is the endpoint failing.)
  if (!stale_pooled && kind != Failure::grpc_status)
    cluster_->record(endpoint_, true, steady_now_ms());
  up_.reset();
  drop_h2();
  try_timer_.cancel();
  last_endpoint_ = endpoint_;
  end_attempt();
  auto& b = cluster_->breakers();
  if (!retry && kind == Failure::try_timeout)
    return local_reply(504,
                       "upstream per-try timeout: route " + route_->name + " allows " +
                           format_duration(route_->retries.per_try_timeout) + " a try (" +
                           std::to_string(attempts_) + " attempt" + (attempts_ > 1 ? "s" : "") +
                           ")\n",
                       "UT");
  if (!retry) {
    const char* flags = kind == Failure::connect ? "UF" : "UR";
    return local_reply(503,
                       std::string("upstream ") +
                           (kind == Failure::connect ? "connect error" : "reset before headers") +
                           " (service '" + cluster_->service().name + "', " +
                           std::to_string(attempts_) + " attempt" + (attempts_ > 1 ? "s" : "") +
                           "): " + why + "\n",
                       flags);
  }
  if (!in_retry_) {
    b.retries.fetch_add(1, std::memory_order_relaxed);
    in_retry_ = true;
  }
  // Exponential backoff with full jitter: base × 2^(n-1), capped, times a random in [0.5, 1].
  const auto& p = route_->retries;
  int64_t ms = p.backoff.count() << std::min(attempts_ - 1, 10u);
  ms = std::min<int64_t>(ms, p.max_backoff.count());
  ms = ms / 2 + static_cast<int64_t>(env_.rng() % static_cast<uint64_t>(ms / 2 + 1));
  if (stale_pooled) ms = 0;
  backoff_.expires_after(std::chrono::milliseconds(ms));
  backoff_.async_wait(
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
        if (!ec && g == self->generation_ && !self->timed_out_) self->attempt();
      });
}

void HttpSession::end_attempt() {
  if (endpoint_counted_ && cluster_ && endpoint_ >= 0)
    cluster_->endpoints()[endpoint_].state->active_requests.fetch_sub(1, std::memory_order_relaxed);
  endpoint_counted_ = false;
}

void HttpSession::on_try_timeout() {
  // The try's upstream connection is closed (its pending I/O cancelled, and a late response
  // can never be taken for the next try's), then the try fails like an unanswered request.
  ++try_seq_;  // the closed connection's cancelled callbacks belong to no try now
  abandon_upstream();
  attempt_failed(Failure::try_timeout,
                 "no response header within " + format_duration(route_->retries.per_try_timeout),
                 may_retry(Failure::try_timeout));
}

void HttpSession::on_timeout() {
  timed_out_ = true;
  backoff_.cancel();
  try_timer_.cancel();
  abandon_upstream();
  if (cluster_) cluster_->record(endpoint_, true, steady_now_ms());
  end_attempt();
  if (!response_started_)
    return local_reply(504,
                       "upstream request timeout: route " +
                           (route_ ? route_->name : std::string()) + " allows " +
                           format_duration(route_->timeout) + "\n",
                       "UT");
  finish_request(entry_.status, "UT", "timeout_during_body");
  close();
}

void HttpSession::local_reply(unsigned status, const std::string& body, const std::string& flags,
                              const std::string& overloaded, bool close_after) {
  if (close_after) down_keep_alive_ = false;
  http::response<http::string_body> res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "text/plain");
  res.set(http::field::server, "weft");
  if (!overloaded.empty()) res.set("x-weft-overloaded", overloaded);
  if (status == 429 || overloaded.size()) res.set(http::field::retry_after, "1");
  res.body() = body;
  res.keep_alive(down_keep_alive_);
  res.prepare_payload();
  entry_.status = status;
  auto msg = std::make_shared<http::response<http::string_body>>(std::move(res));
  const std::string result = body.substr(0, body.size() - 1);
  http::async_write(down_, *msg,
                    [self = shared_from_this(), msg, g = generation_, status, flags, result](
                        const boost::system::error_code& ec, size_t n) {
                      if (g != self->generation_) return;
                      self->resp_bytes_ += n;
                      self->finish_request(status, flags, result);
                      if (ec) return self->close();
                      if (!self->down_keep_alive_) return self->linger_close();
                      self->read_request();
                    });
}

void HttpSession::rewrite_response(http::fields& f) const { rewrite(f, route_->response_headers); }

void HttpSession::local_reply(const LocalReply& r) {
  local_reply(r.status, r.body, r.flags, r.overloaded);
}

void HttpSession::finish_request(unsigned status, const std::string& flags,
                                 const std::string& result) {
  timer_.cancel();
  backoff_.cancel();
  try_timer_.cancel();
  end_attempt();
  if (cluster_) {
    auto& b = cluster_->breakers();
    if (counted_request_) b.requests.fetch_sub(1, std::memory_order_relaxed);
    if (in_retry_) b.retries.fetch_sub(1, std::memory_order_relaxed);
  }
  counted_request_ = false;
  in_retry_ = false;
  if (entry_.method.empty()) return;  // nothing was parsed: no request to account for
  entry_.status = status;
  entry_.attempts = attempts_;
  if (entry_.response_flags.empty() || flags != "-") entry_.response_flags = flags;
  entry_.result = result;
  entry_.bytes_received = req_bytes_;
  entry_.bytes_sent = resp_bytes_;
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
          .count();
  record_request(env_, listener_, cluster_, entry_, ms);
  entry_.method.clear();
}

// A client may still be sending the body we refused: closing with unread bytes would reset the
// connection and destroy our answer before it reads it. Stop sending, read and discard for a
// moment (as nginx's lingering_close), then close.
void HttpSession::linger_close() {
  ++generation_;
  down_.shutdown_send();
  timer_.expires_after(std::chrono::seconds(2));
  timer_.async_wait(
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec) {
        if (!ec && g == self->generation_) self->close();
      });
  drain_downstream();
}

void HttpSession::drain_downstream() {
  down_.async_read_some(
      asio::buffer(body_chunk_),
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec, size_t) {
        if (g != self->generation_) return;
        if (ec) return self->close();
        self->drain_downstream();
      });
}

void HttpSession::abandon_upstream() {
  drop_h2();
  if (!up_) return;
  up_->socket.close();
  up_.reset();
}

void HttpSession::close() {
  ++generation_;
  timer_.cancel();
  backoff_.cancel();
  try_timer_.cancel();
  end_attempt();
  if (counted_request_ && cluster_) {
    cluster_->breakers().requests.fetch_sub(1, std::memory_order_relaxed);
    counted_request_ = false;
  }
  if (in_retry_ && cluster_) {
    cluster_->breakers().retries.fetch_sub(1, std::memory_order_relaxed);
    in_retry_ = false;
  }
  abandon_upstream();
  down_.close();
}

}  // namespace weft
