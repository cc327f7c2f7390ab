#include "proxy/http/h2_downstream.h"

#include <nghttp2/nghttp2.h>
#include <spdlog/spdlog.h>

#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>

#include "core/ascii.h"
#include "proxy/http/h2_fields.h"
#include "proxy/http/h2_forward.h"
#include "proxy/http/h2_stream.h"
#include "transport/hbone/h2_options.h"
#include "transport/hbone/pipe_pair.h"

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

constexpr std::string_view kPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
constexpr size_t kReadSize = 64 * 1024;
constexpr size_t kMaxWriteBatch = 256 * 1024;
constexpr size_t kMaxHeaderBytes = 64 * 1024;
constexpr size_t kMaxBuffered = 256 * 1024;  // response bytes waiting for the client's window
constexpr auto kIdle = std::chrono::minutes(5);

H2Downstream* self(void* user) { return static_cast<H2Downstream*>(user); }

int cb_begin_headers(nghttp2_session*, const nghttp2_frame* f, void* user) {
  return self(user)->on_begin_headers(f->hd.stream_id, f->headers.cat);
}

int cb_header(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
              const uint8_t* value, size_t valuelen, uint8_t, void* user) {
  return self(user)->on_header(f->hd.stream_id, {reinterpret_cast<const char*>(name), namelen},
                               {reinterpret_cast<const char*>(value), valuelen});
}

int cb_frame_recv(nghttp2_session*, const nghttp2_frame* f, void* user) {
  const int category = f->hd.type == NGHTTP2_HEADERS ? f->headers.cat : -1;
  return self(user)->on_frame_recv(f->hd.stream_id, f->hd.type, f->hd.flags, category);
}

int cb_data_chunk(nghttp2_session*, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                  void* user) {
  return self(user)->on_data_chunk(stream_id, data, len);
}

int cb_stream_close(nghttp2_session*, int32_t stream_id, uint32_t, void* user) {
  return self(user)->on_stream_close(stream_id);
}

ssize_t cb_read_data(nghttp2_session*, int32_t, uint8_t* buf, size_t len, uint32_t* flags,
                     nghttp2_data_source* source, void* user) {
  return self(user)->provide_body(*static_cast<H2Downstream::Stream*>(source->ptr), buf, len,
                                  flags);
}

nghttp2_nv nv(std::string_view name, std::string_view value) {
  return {const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(name.data())),
          const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(value.data())), name.size(),
          value.size(), NGHTTP2_NV_FLAG_NONE};
}

// Connection-specific fields have no place in HTTP/2 (RFC 9113 8.2.2).
bool connection_specific(std::string_view lower_name) {
  return lower_name == "connection" || lower_name == "keep-alive" ||
         lower_name == "proxy-connection" || lower_name == "transfer-encoding" ||
         lower_name == "upgrade" || lower_name == "te";
}

}  // namespace

PrefaceMatch match_h2_preface(std::string_view bytes) {
  const size_t n = std::min(bytes.size(), kPreface.size());
  if (bytes.substr(0, n) != kPreface.substr(0, n)) return PrefaceMatch::no;
  return n == kPreface.size() ? PrefaceMatch::yes : PrefaceMatch::partial;
}

H2Downstream::H2Downstream(HttpWorkerEnv& env, SnapshotPtr snapshot, HttpListenerView view,
                           ByteStream downstream)
    : env_(env),
      snap_(std::move(snapshot)),
      view_(std::move(view)),
      down_(std::move(downstream)),
      idle_timer_(env.io) {
  nghttp2_session_callbacks* cbs = nullptr;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, cb_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_stream_close);
  // (Request bytes are credited back only once the session took them: the backpressure.)
  nghttp2_option* opt = new_h2_options();
  nghttp2_session_server_new2(&session_, cbs, this, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  boost::system::error_code ignored;
  if (!down_.pipe()) down_.tcp().set_option(tcp::no_delay(true), ignored);
  client_ip_ = down_.remote_ip();
}

H2Downstream::~H2Downstream() {
  for (auto& [id, s] : streams_)
    if (s->forward) s->forward->downstream_closed();
  nghttp2_session_del(session_);
  if (view_.downstream.empty()) env_.metrics.downstream_connections_active.dec();
}

void H2Downstream::drain() {
  go_away_if_draining();
  flush();
}

void H2Downstream::start() {
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1024 * 1024},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, kMaxHeaderBytes},
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      kNoRfc7540Priorities,
  };
  nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, iv, 5);
  in_.reset(new uint8_t[kReadSize]);
  // (A peer proxy's stream reaches an inbound one through a socket pair: not a client's.)
  if (view_.downstream.empty()) env_.metrics.downstream_connections_active.inc();
  env_.track(weak_from_this());
  arm_idle_timer();
  flush();
  do_read();
}

void H2Downstream::arm_idle_timer() {
  idle_timer_.expires_after(kIdle);
  idle_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec || self->closed_) return;
    if (self->streams_.empty() && !self->active_since_timer_) return self->terminate();
    self->active_since_timer_ = false;
    self->arm_idle_timer();
  });
}

void H2Downstream::do_read() {
  down_.async_read_some(asio::buffer(in_.get(), kReadSize),
                        [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                          if (self->closed_) return;
                          if (ec) return self->terminate();
                          if (self->lingering_) return self->do_read();  // discarded
                          self->active_since_timer_ = true;
                          self->in_nghttp2_ = true;
                          const ssize_t rv =
                              nghttp2_session_mem_recv(self->session_, self->in_.get(), n);
                          self->in_nghttp2_ = false;
                          if (rv < 0) {
                            spdlog::debug("h2 listener {}: bad HTTP/2 from the client: {}",
                                          self->view_.name, nghttp2_strerror(static_cast<int>(rv)));
                            return self->terminate();
                          }
                          self->go_away_if_draining();
                          self->flush();
                          if (!self->closed_) self->do_read();
                        });
}

void H2Downstream::flush() {
  // nghttp2 is not reentrant: output produced inside a callback is sent after it returns.
  if (in_nghttp2_ || writing_ || closed_) return;
  in_nghttp2_ = true;
  out_.clear();
  while (out_.size() < kMaxWriteBatch) {
    const uint8_t* data = nullptr;
    const ssize_t n = nghttp2_session_mem_send(session_, &data);
    if (n < 0) {
      in_nghttp2_ = false;
      return terminate();
    }
    if (n == 0) break;
    out_.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
  in_nghttp2_ = false;
  if (out_.empty()) {
    if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_))
      linger_close();
    return;
  }
  writing_ = true;
  asio::async_write(down_, asio::buffer(out_),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      self->writing_ = false;
                      if (self->closed_) return;
                      if (ec) return self->terminate();
                      self->flush();
                    });
}

// The session is over (GOAWAY sent, its streams done): stop sending and read what the client
// still has in flight (WINDOW_UPDATE, a SETTINGS ACK) for a moment, so the close is a FIN and
// not a reset that could destroy our last frames before the client reads them.
void H2Downstream::linger_close() {
  if (closed_ || lingering_) return;
  lingering_ = true;
  down_.shutdown_send();
  idle_timer_.expires_after(std::chrono::seconds(2));
  idle_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->terminate();
  });
}

void H2Downstream::terminate() {
  if (closed_) return;
  closed_ = true;
  idle_timer_.cancel();
  down_.close();
  // Each HttpSession sees its bridge close and ends its request.
  for (auto& [id, s] : streams_) {
    s->closed = true;
    if (s->bridge) s->bridge->close();
    if (s->forward) s->forward->downstream_closed();
  }
  streams_.clear();
  for (auto& b : idle_bridges_) b->close();
  idle_bridges_.clear();
}

int H2Downstream::on_begin_headers(int32_t stream_id, int category) {
  if (category == NGHTTP2_HCAT_REQUEST) streams_[stream_id] = std::make_shared<Stream>(stream_id);
  return 0;
}

int H2Downstream::on_header(int32_t stream_id, std::string_view name, std::string_view value) {
  auto it = streams_.find(stream_id);
  if (it == streams_.end()) return 0;
  Stream& s = *it->second;
  if (s.head_done) {
    // Request trailers. An HTTP/2 service gets them; the HTTP/1.1 bridge drops them (as Envoy
    // does for HTTP/1.1 upstreams by default): its framing may not be chunked.
    s.header_bytes += name.size() + value.size() + 32;
    if (s.header_bytes > kMaxHeaderBytes) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (name[0] != ':') s.request_trailers.emplace_back(name, value);
    return 0;
  }
  // nghttp2 has validated names and values (no CR, LF or NUL; lower-case names; pseudo-headers
  // first and well-formed), so they can be written as HTTP/1.1 field lines as they are.
  s.header_bytes += name.size() + value.size() + 32;
  if (name == ":method")
    s.method = value;
  else if (name == ":authority")
    s.authority = value;
  else if (name == ":path")
    s.path = value;
  else if (name[0] == ':')
    return 0;  // :scheme; :protocol is refused with the extended CONNECT it comes with
  else if (name == "host") {
    if (s.authority.empty()) s.authority = value;
  } else if (name == "cookie") {
    // HTTP/2 may split cookies into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3).
    if (!s.cookie.empty()) s.cookie += "; ";
    s.cookie += value;
  } else if (name != "expect") {
    // (expect: 100-continue would make the session answer 100, which is no final response;
    // the body is on its way regardless.)
    if (name == "content-length") s.has_length = true;
    s.fields.emplace_back(name, value);
  }
  if (s.header_bytes > kMaxHeaderBytes)
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets this stream only
  return 0;
}

int H2Downstream::on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags, int category) {
  auto it = streams_.find(stream_id);
  if (it == streams_.end()) return 0;
  auto s = it->second;
  const bool end_stream = (flags & NGHTTP2_FLAG_END_STREAM) != 0;
  if (type == NGHTTP2_HEADERS && category == NGHTTP2_HCAT_REQUEST) {
    s->head_done = true;
    start_exchange(s, end_stream);
    return 0;
  }
  if ((type == NGHTTP2_DATA || type == NGHTTP2_HEADERS) && end_stream && !s->request_done) {
    s->request_done = true;
    if (s->forward) {
      if (type == NGHTTP2_HEADERS) s->forward->request_trailers(std::move(s->request_trailers));
      s->forward->request_end();
      return 0;
    }
    if (s->chunked) s->to_bridge += "0\r\n\r\n";
    pump_request(s);
  }
  return 0;
}

int H2Downstream::on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len) {
  auto it = streams_.find(stream_id);
  if (it != streams_.end() && it->second->forward) {
    it->second->forward->request_data(data, len);
    return 0;
  }
  if (it == streams_.end() || !it->second->bridge) {
    nghttp2_session_consume(session_, stream_id, len);  // keep the connection window open
    return 0;
  }
  auto& s = it->second;
  if (s->chunked) {
    char size_line[24];
    const int n = std::snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    s->to_bridge.append(size_line, static_cast<size_t>(n));
  }
  s->to_bridge.append(reinterpret_cast<const char*>(data), len);
  if (s->chunked) s->to_bridge += "\r\n";
  s->data_pending += len;
  pump_request(s);
  return 0;
}

void H2Downstream::go_away_if_draining() {
  if (!env_.draining || going_away_ || closed_) return;
  // Streams up to the last one we saw are still served; the client opens new ones elsewhere.
  going_away_ = true;
  nghttp2_submit_goaway(session_, NGHTTP2_FLAG_NONE,
                        nghttp2_session_get_last_proc_stream_id(session_), NGHTTP2_NO_ERROR,
                        nullptr, 0);
  if (streams_.empty()) nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
}

int H2Downstream::on_stream_close(int32_t stream_id) {
  auto it = streams_.find(stream_id);
  if (it == streams_.end()) return 0;
  auto s = std::move(it->second);
  streams_.erase(it);
  if (going_away_ && streams_.empty())
    nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
  s->closed = true;
  if (s->bridge) s->bridge->close();  // a reset mid-request ends the session's request
  if (s->forward) s->forward->downstream_closed();
  return 0;
}

void H2Downstream::start_exchange(const std::shared_ptr<Stream>& s, bool end_stream) {
  if (s->method == "CONNECT")
    return local_answer(s, 405, "CONNECT is not proxied on an HTTP listener\n");
  if (H2Forward::take(*this, s, end_stream)) return;
  s->bridge = take_bridge();
  if (!s->bridge) {
    auto [ours, theirs] = PipePair::make(env_.io.get_executor());
    s->bridge = std::make_unique<ByteStream>(std::move(ours));
    HttpListenerView view = view_;
    view.protocol = "http/2";
    if (view.downstream.empty()) view.downstream = client_ip_;
    std::make_shared<HttpSession>(env_, snap_, std::move(view), ByteStream(std::move(theirs)))
        ->start();
  }

  std::string head;
  head.reserve(s->fields.size() + 128);
  head.append(s->method).append(" ").append(s->path).append(" HTTP/1.1\r\nhost: ");
  head.append(s->authority).append("\r\n");
  for (const auto& [name, value] : s->fields)
    if (name != "te") head.append(name).append(": ").append(value).append("\r\n");
  if (!s->cookie.empty()) head.append("cookie: ").append(s->cookie).append("\r\n");
  s->chunked = !end_stream && !s->has_length;
  if (s->chunked) head += "transfer-encoding: chunked\r\n";
  head += "\r\n";
  s->to_bridge.insert(0, head);
  s->fields.clear();
  s->cookie.clear();
  if (end_stream) s->request_done = true;
  s->rd = std::make_unique<Stream::BridgeResponse>();
  if (s->method == "HEAD") s->rd->parser.skip(true);
  s->rd->parser.body_limit(boost::none);
  s->rd->parser.header_limit(kMaxHeaderBytes);
  pump_request(s);
  read_response_head(s);
}

void H2Downstream::pump_request(const std::shared_ptr<Stream>& s) {
  if (s->writing || s->to_bridge.empty() || !s->bridge || s->closed) return;
  s->writing = true;
  s->writing_now.swap(s->to_bridge);
  s->to_bridge.clear();
  s->data_writing = s->data_pending;
  s->data_pending = 0;
  asio::async_write(*s->bridge, asio::buffer(s->writing_now),
                    [self = shared_from_this(), s](const boost::system::error_code& ec, size_t) {
                      s->writing = false;
                      s->writing_now.clear();
                      if (self->closed_) return;
                      // Credited even when the session stopped reading (it answered early,
                      // say 413): the connection window must not shrink for good.
                      nghttp2_session_consume(self->session_, s->id, s->data_writing);
                      s->data_writing = 0;
                      self->flush();
                      if (ec) return;
                      self->pump_request(s);
                      self->recycle_bridge(s);
                    });
}

void H2Downstream::recycle_bridge(const std::shared_ptr<Stream>& s) {
  if (!s->bridge || !s->rd) return;
  const bool request_through = s->request_done && !s->writing && s->to_bridge.empty();
  const bool response_through = s->response_done && !s->reading && s->rd->parser.is_done() &&
                                s->rd->parser.keep_alive() && s->rd->buffer.size() == 0;
  if (s->closed || closed_ || !request_through || !response_through) return;
  if (idle_bridges_.size() < 128) idle_bridges_.push_back(std::move(s->bridge));
  s->bridge.reset();
}

std::unique_ptr<ByteStream> H2Downstream::take_bridge() {
  while (!idle_bridges_.empty()) {
    auto b = std::move(idle_bridges_.back());
    idle_bridges_.pop_back();
    // Still open with nothing unread (its session closes it when idle for long).
    if (b->pipe()->reusable()) return b;
    b->close();
  }
  return nullptr;
}

void H2Downstream::read_response_head(const std::shared_ptr<Stream>& s) {
  http::async_read_header(
      *s->bridge, s->rd->buffer, s->rd->parser,
      [self = shared_from_this(), s](const boost::system::error_code& ec, size_t) {
        if (s->closed || self->closed_) return;
        if (ec) return self->reset(s);
        self->submit_head(s);
      });
}

void H2Downstream::submit_head(const std::shared_ptr<Stream>& s) {
  auto& msg = s->rd->parser.get();
  s->head.clear();
  s->head.reserve(2 + 2 * 16);
  s->head.emplace_back(":status");
  s->head.emplace_back(std::to_string(msg.result_int()));
  for (const auto& f : msg) {
    std::string name = ascii_lower(f.name_string());
    if (connection_specific(name)) continue;
    s->head.push_back(std::move(name));
    s->head.emplace_back(f.value());
  }
  std::vector<nghttp2_nv> nva;
  nva.reserve(s->head.size() / 2);
  for (size_t i = 0; i + 1 < s->head.size(); i += 2) nva.push_back(nv(s->head[i], s->head[i + 1]));
  const bool no_body = s->rd->parser.is_done();
  s->response_done = no_body;
  nghttp2_data_provider prd{};
  prd.source.ptr = s.get();
  prd.read_callback = cb_read_data;
  nghttp2_submit_response(session_, s->id, nva.data(), nva.size(), no_body ? nullptr : &prd);
  flush();
  if (no_body) return recycle_bridge(s);
  read_response_body(s);
}

void H2Downstream::read_response_body(const std::shared_ptr<Stream>& s) {
  if (s->reading || s->response_done || s->closed || s->body.size() - s->body_off >= kMaxBuffered)
    return;
  s->reading = true;
  auto& body = s->rd->parser.get().body();
  body.data = s->rd->chunk;
  body.size = sizeof s->rd->chunk;
  http::async_read_some(
      *s->bridge, s->rd->buffer, s->rd->parser,
      [self = shared_from_this(), s](const boost::system::error_code& ec, size_t) {
        s->reading = false;
        if (s->closed || self->closed_) return;
        if (ec && ec != http::error::need_buffer) return self->reset(s);
        const size_t got = sizeof s->rd->chunk - s->rd->parser.get().body().size;
        s->body.append(s->rd->chunk, got);
        s->response_done = s->rd->parser.is_done();
        nghttp2_session_resume_data(self->session_, s->id);
        self->flush();
        self->read_response_body(s);
        self->recycle_bridge(s);
      });
}

long H2Downstream::provide_body(Stream& s, uint8_t* buf, size_t len, uint32_t* flags) {
  const size_t avail = s.body.size() - s.body_off;
  const size_t n = std::min(len, avail);
  std::memcpy(buf, s.body.data() + s.body_off, n);
  s.body_off += n;
  if (s.body_off == s.body.size()) {
    s.body.clear();
    s.body_off = 0;
  }
  if (s.forward && n) s.forward->response_sent(n);
  if (s.response_done && s.body.empty()) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (!s.trailers.empty()) {
      // The trailers (gRPC's grpc-status) end the stream instead of the last DATA frame.
      *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
      const auto nva = to_nva(s.trailers);
      nghttp2_submit_trailer(session_, s.id, nva.data(), nva.size());
    }
    return static_cast<long>(n);
  }
  if (s.forward) return n ? static_cast<long>(n) : long{NGHTTP2_ERR_DEFERRED};
  if (n == 0) {
    // Drained: read more (the completion resumes us), unless a read is under way.
    if (auto it = streams_.find(s.id); it != streams_.end()) read_response_body(it->second);
    return NGHTTP2_ERR_DEFERRED;
  }
  if (auto it = streams_.find(s.id); it != streams_.end()) read_response_body(it->second);
  return static_cast<long>(n);
}

void H2Downstream::local_answer(const std::shared_ptr<Stream>& s, int status,
                                const std::string& body) {
  s->head = {":status", std::to_string(status), "content-type", "text/plain", "server", "weft"};
  std::vector<nghttp2_nv> nva;
  for (size_t i = 0; i + 1 < s->head.size(); i += 2) nva.push_back(nv(s->head[i], s->head[i + 1]));
  s->body = body;
  s->response_done = true;
  nghttp2_data_provider prd{};
  prd.source.ptr = s.get();
  prd.read_callback = cb_read_data;
  nghttp2_submit_response(session_, s->id, nva.data(), nva.size(), &prd);
  flush();
}

void H2Downstream::reset(const std::shared_ptr<Stream>& s) {
  // The session went away without a (whole) response: the client sees the stream reset.
  nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_INTERNAL_ERROR);
  flush();
}

void H2Downstream::respond(const std::shared_ptr<Stream>& s, const H2Fields& head,
                           bool end_stream) {
  const auto nva = to_nva(head);
  s->response_done = end_stream;
  nghttp2_data_provider prd{};
  prd.source.ptr = s.get();
  prd.read_callback = cb_read_data;
  nghttp2_submit_response(session_, s->id, nva.data(), nva.size(), end_stream ? nullptr : &prd);
  flush();
}

void H2Downstream::resume_response(Stream& s) {
  nghttp2_session_resume_data(session_, s.id);
  flush();
}

void H2Downstream::reset_stream(Stream& s, uint32_t error_code) {
  nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, s.id, error_code);
  flush();
}

}  // namespace weft
