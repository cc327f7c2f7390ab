// HttpSession towards a service that speaks only HTTP/2 (`http: {protocol: http2}`): the
// buffered HTTP/1.1 request goes as one stream on a shared H2Upstream connection, and the
// answer is framed back as HTTP/1.1 (chunked unless the app gave a content-length; trailers,
// gRPC's among them, in the last chunk). Retries, per-try and route timeouts, outlier
// detection and the metrics are the session's own, as for an HTTP/1.1 upstream.
#include <nghttp2/nghttp2.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <boost/asio/write.hpp>
#include <boost/beast/http/rfc7230.hpp>

#include "core/ascii.h"
#include "proxy/http/http_session.h"
#include "proxy/http/request_policy.h"

namespace weft {

namespace asio = boost::asio;
namespace http = boost::beast::http;

namespace {

// Fields HTTP/2 has no place for (RFC 9113 8.2.2), besides Host, which becomes :authority.
bool not_for_h2(http::field f) {
  return f == http::field::host || f == http::field::connection || f == http::field::keep_alive ||
         f == http::field::proxy_connection || f == http::field::transfer_encoding ||
         f == http::field::upgrade || f == http::field::te;
}

// Streams an app refuses (at its stream limit, or recycling the connection) go again at
// once, up to this many times: each try is on a newer connection.
constexpr unsigned kMaxRefusals = 3;

}  // namespace

// The stream's sink. Callbacks of a try the session gave up on (a new request, a later try,
// the route timeout) are dropped: the session resets such a stream in drop_h2().
class HttpSession::H2Reply : public H2Upstream::Sink {
 public:
  H2Reply(std::weak_ptr<HttpSession> s, uint64_t generation, uint64_t try_seq)
      : session_(std::move(s)), generation_(generation), try_seq_(try_seq) {}

  void on_response_head(H2Fields fields, bool end_stream) override {
    if (auto s = live()) s->on_h2_head(std::move(fields), end_stream);
  }
  void on_response_data(const uint8_t* data, size_t len) override {
    if (auto s = live()) s->on_h2_data(data, len);
  }
  void on_response_trailers(H2Fields fields) override {
    if (auto s = live()) s->h2_trailers_ = std::move(fields);
  }
  void on_stream_end(uint32_t error_code) override {
    if (auto s = live()) s->on_h2_end(error_code);
  }
  size_t pull_request_body(uint8_t* buf, size_t len, bool* eof) override {
    auto s = live();
    if (!s) {
      *eof = true;
      return 0;
    }
    const std::string& body = s->h2_signed_body_.empty() ? s->req_.body() : s->h2_signed_body_;
    const size_t n = std::min(len, body.size() - s->h2_body_off_);
    std::memcpy(buf, body.data() + s->h2_body_off_, n);
    s->h2_body_off_ += n;
    *eof = s->h2_body_off_ == body.size();
    return n;
  }

 private:
  std::shared_ptr<HttpSession> live() const {
    auto s = session_.lock();
    if (!s || s->generation_ != generation_ || s->try_seq_ != try_seq_ || s->timed_out_)
      return nullptr;
    return s;
  }
  std::weak_ptr<HttpSession> session_;
  uint64_t generation_, try_seq_;
};

// A connection for the try's stream: one being opened to the endpoint already when it has
// room (the pool's join), else a new one, shared with the streams that come meanwhile.
void HttpSession::open_h2() {
  auto ready = [self = shared_from_this(), g = generation_, a = try_seq_](
                   std::shared_ptr<H2Upstream> up, const std::string& failure) {
    if (g != self->generation_ || a != self->try_seq_ || self->timed_out_) return;
    if (!up)
      return self->attempt_failed(Failure::connect, failure, self->may_retry(Failure::connect));
    // (A connection that others filled first: another one. A new one that takes no stream is
    // a failed connect.)
    const bool fresh = up->active_streams() == 0;
    self->send_h2(std::move(up), fresh);
  };
  if (env_.pool.join_h2_connecting(*cluster_, endpoint_, ready)) return;
  if (auto r = take_connection_slot(*cluster_)) {
    end_attempt();
    return local_reply(*r);
  }
  env_.pool.open_h2(*cluster_, endpoint_, !env_.draining,
                    [ready, breakers = cluster_->breakers_ptr()](std::shared_ptr<H2Upstream> up,
                                                                 const std::string& failure) {
                      breakers->pending.fetch_sub(1, std::memory_order_relaxed);
                      ready(std::move(up), failure);
                    });
}

void HttpSession::send_h2(std::shared_ptr<H2Upstream> up, bool fresh) {
  if (!listener_.inbound) entry_.peer_identity = up->conn().peer_identity;
  entry_.authority = cluster_->endpoints()[endpoint_].config.authority;
  sign_request(true);
  H2Fields head{{":method", std::string(req_.method_string())},
                {":scheme", "http"},
                {":authority", std::string(req_[http::field::host])},
                {":path", std::string(req_.target())}};
  // A body in signed chunks is longer than the client's content-length.
  const bool framed = !h2_signed_body_.empty();
  for (const auto& f : req_)
    if (!not_for_h2(f.name()) && !(framed && f.name() == http::field::content_length))
      head.emplace_back(ascii_lower(f.name_string()), f.value());
  // TE went with the hop-by-hop fields; gRPC servers want `te: trailers` (the one value
  // HTTP/2 allows), and every gRPC client sends it.
  if (req_[http::field::content_type].starts_with("application/grpc"))
    head.emplace_back("te", "trailers");
  h2_body_off_ = 0;
  h2_out_.clear();
  h2_trailers_.clear();
  h2_chunked_ = h2_ended_ = false;
  h2_credit_ = h2_credit_writing_ = 0;
  h2_reply_ = std::make_shared<H2Reply>(weak_from_this(), generation_, try_seq_);
  const int32_t id = up->submit(head, !req_.body().empty(), h2_reply_);
  if (id < 0) {
    h2_reply_.reset();
    // A shared connection that filled up or is going away: a new one. A new one that takes
    // no stream is a failed connect.
    if (!fresh) return open_upstream();
    return attempt_failed(Failure::connect, "the new HTTP/2 connection took no stream",
                          may_retry(Failure::connect));
  }
  up_h2_ = std::move(up);
  up_h2_id_ = id;
}

void HttpSession::on_h2_head(H2Fields fields, bool end_stream) {
  try_timer_.cancel();
  const unsigned status =
      fields.empty() || fields.front().first != ":status"
          ? 502
          : static_cast<unsigned>(std::strtoul(fields.front().second.c_str(), nullptr, 10));
  if (status >= 500 && may_retry(Failure::status_5xx))
    return attempt_failed(Failure::status_5xx, std::to_string(status), true);
  if (end_stream && route_->retries.on_grpc) {
    // Trailers-only: a gRPC status with no message, retried when the route names it (as
    // the HTTP/2 forwarder does).
    int code = -1;
    for (const auto& [name, value] : fields)
      if (name == "grpc-status" && value.size() <= 2) code = std::atoi(value.c_str());
    if (code > 0 && code <= 16 && (route_->retries.on_grpc & (1u << code)) &&
        may_retry(Failure::grpc_status)) {
      cluster_->record(endpoint_, code == 14, steady_now_ms());  // UNAVAILABLE: a failure
      return attempt_failed(Failure::grpc_status, "grpc-status " + std::to_string(code), true);
    }
  }
  cluster_->record(endpoint_, status >= 500, steady_now_ms());
  http::response<http::empty_body> head{static_cast<http::status>(status), 11};
  bool has_length = false;
  for (const auto& [name, value] : fields) {
    if (name.starts_with(':')) continue;
    has_length = has_length || name == "content-length";
    head.insert(name, value);
  }
  rewrite_response(head);
  const bool bodiless = req_.method() == http::verb::head || status == 204 || status == 304;
  if (end_stream && !has_length && !bodiless) head.content_length(0);
  h2_chunked_ = !end_stream && !has_length && !bodiless;
  if (h2_chunked_) head.set(http::field::transfer_encoding, "chunked");
  head.keep_alive(down_keep_alive_);
  response_started_ = true;
  entry_.status = status;
  h2_out_ = "HTTP/1.1 " + std::to_string(status) + " " +
            std::string(http::obsolete_reason(static_cast<http::status>(status))) + "\r\n";
  for (const auto& f : head)
    h2_out_.append(f.name_string()).append(": ").append(f.value()).append("\r\n");
  h2_out_ += "\r\n";
  h2_ended_ = end_stream;
  write_h2();
}

void HttpSession::on_h2_data(const uint8_t* data, size_t len) {
  if (!response_started_) return;
  if (h2_chunked_) {
    char size_line[24];
    const int n = std::snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    h2_out_.append(size_line, static_cast<size_t>(n));
  }
  h2_out_.append(reinterpret_cast<const char*>(data), len);
  if (h2_chunked_) h2_out_ += "\r\n";
  h2_credit_ += len;
  write_h2();
}

void HttpSession::on_h2_end(uint32_t error_code) {
  up_h2_id_ = -1;  // the stream is over either way
  if (error_code != NGHTTP2_NO_ERROR || !response_started_) {
    const std::string why =
        std::string("upstream reset the stream: ") + nghttp2_http2_strerror(error_code);
    // Refused (REFUSED_STREAM, or above a GOAWAY's last stream): the app never saw it, so it
    // goes again at once, as a request on a pooled connection the app had just closed.
    if (!response_started_ && error_code == NGHTTP2_REFUSED_STREAM &&
        ++h2_refusals_ <= kMaxRefusals) {
      drop_h2();
      end_attempt();
      if (endpoint_ >= 0 && endpoint_ < 64) tried_ &= ~(1ull << endpoint_);  // it may go again
      return attempt();
    }
    if (!response_started_) return attempt_failed(Failure::reset, why, may_retry(Failure::reset));
    drop_h2();
    finish_request(entry_.status, "UR", "upstream_reset_during_body: " + why);
    return close();
  }
  h2_ended_ = true;
  if (h2_chunked_) {
    h2_out_ += "0\r\n";
    for (const auto& [name, value] : h2_trailers_)
      h2_out_.append(name).append(": ").append(value).append("\r\n");
    h2_out_ += "\r\n";
  }
  write_h2();
}

void HttpSession::write_h2() {
  if (h2_write_busy_) return;
  if (h2_out_.empty()) {
    if (!h2_ended_) return;
    drop_h2();
    finish_request(entry_.status, "-", "ok");
    if (down_keep_alive_) return read_request();
    return close();
  }
  h2_write_busy_ = true;
  h2_writing_.swap(h2_out_);
  h2_out_.clear();
  h2_credit_writing_ = h2_credit_;
  h2_credit_ = 0;
  asio::async_write(
      down_, asio::buffer(h2_writing_),
      [self = shared_from_this(), g = generation_](const boost::system::error_code& ec, size_t n) {
        self->h2_write_busy_ = false;
        if (g != self->generation_) return;
        self->resp_bytes_ += n;
        if (ec) {
          self->drop_h2();
          self->finish_request(self->entry_.status, "DC", "downstream_closed: " + ec.message());
          return self->close();
        }
        // Written on: the app may send as much again.
        if (self->up_h2_) self->up_h2_->consume(self->up_h2_id_, self->h2_credit_writing_);
        self->h2_credit_writing_ = 0;
        self->write_h2();
      });
}

void HttpSession::drop_h2() {
  if (up_h2_) {
    // What the client never got is credited all the same: the connection's window is shared.
    if (const size_t owed = h2_credit_ + h2_credit_writing_) up_h2_->consume(up_h2_id_, owed);
    if (up_h2_id_ >= 0) up_h2_->reset(up_h2_id_);
  }
  up_h2_.reset();
  h2_reply_.reset();
  up_h2_id_ = -1;
  h2_credit_ = h2_credit_writing_ = 0;
}

}  // namespace weft
