#include "proxy/http/h2_upstream.h"

#include "proxy/http/h2_fields.h"
#include "transport/hbone/h2_options.h"

#include <nghttp2/nghttp2.h>
#include <spdlog/spdlog.h>

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

namespace weft {

namespace asio = boost::asio;

namespace {

constexpr size_t kReadSize = 64 * 1024;
constexpr size_t kMaxWriteBatch = 256 * 1024;
constexpr uint32_t kStreamWindow = 1024 * 1024;
constexpr int32_t kConnectionWindow = 16 * 1024 * 1024;

H2Upstream* up(void* user) { return static_cast<H2Upstream*>(user); }

int cb_header(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
              const uint8_t* value, size_t valuelen, uint8_t, void* user) {
  return up(user)->on_header(f->hd.stream_id, f->headers.cat,
                             {reinterpret_cast<const char*>(name), namelen},
                             {reinterpret_cast<const char*>(value), valuelen});
}

int cb_frame_recv(nghttp2_session*, const nghttp2_frame* f, void* user) {
  if (f->hd.type == NGHTTP2_GOAWAY) up(user)->on_goaway();
  const uint8_t cat = f->hd.type == NGHTTP2_HEADERS ? static_cast<uint8_t>(f->headers.cat) : 0;
  return up(user)->on_frame_recv(f->hd.stream_id, f->hd.type, f->hd.flags, cat);
}

int cb_data_chunk(nghttp2_session*, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                  void* user) {
  return up(user)->on_data_chunk(stream_id, data, len);
}

int cb_stream_close(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* user) {
  return up(user)->on_stream_close(stream_id, error_code);
}

ssize_t cb_read_data(nghttp2_session*, int32_t stream_id, uint8_t* buf, size_t len, uint32_t* flags,
                     nghttp2_data_source*, void* user) {
  return up(user)->pull(stream_id, buf, len, flags);
}

}  // namespace

H2Upstream::H2Upstream(asio::io_context& io, std::shared_ptr<UpstreamConn> conn)
    : io_(io), conn_(std::move(conn)), idle_(io) {
  nghttp2_session_callbacks* cbs = nullptr;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_header_callback(cbs, cb_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_stream_close);
  // (Response bytes are credited back only once the downstream side took them.)
  nghttp2_option* opt = new_h2_options();
  nghttp2_session_client_new2(&session_, cbs, this, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
}

H2Upstream::~H2Upstream() { nghttp2_session_del(session_); }

void H2Upstream::start() {
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kStreamWindow},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 64 * 1024},
      kNoRfc7540Priorities,
  };
  nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, iv, 4);
  nghttp2_session_set_local_window_size(session_, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
  in_.reset(new uint8_t[kReadSize]);
  arm_idle();
  flush();
  do_read();
}

bool H2Upstream::has_room() const {
  if (closed_ || going_away_) return false;
  const uint32_t peer_limit =
      nghttp2_session_get_remote_settings(session_, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
  return sinks_.size() < std::min(peer_limit, kMaxStreams) &&
         nghttp2_session_get_next_stream_id(session_) < (1u << 30);
}

int32_t H2Upstream::submit(const H2Fields& head, bool has_body, std::weak_ptr<Sink> sink) {
  if (!has_room()) return -1;
  const auto nva = to_nva(head);
  nghttp2_data_provider prd{};
  prd.read_callback = cb_read_data;
  const int32_t id = nghttp2_submit_request(session_, nullptr, nva.data(), nva.size(),
                                            has_body ? &prd : nullptr, nullptr);
  if (id < 0) return -1;
  sinks_[id].sink = std::move(sink);
  schedule_flush();
  return id;
}

void H2Upstream::resume(int32_t stream_id) {
  if (closed_) return;
  nghttp2_session_resume_data(session_, stream_id);
  schedule_flush();
}

void H2Upstream::consume(int32_t stream_id, size_t n) {
  if (closed_ || n == 0) return;
  nghttp2_session_consume(session_, stream_id, n);
  schedule_flush();
}

void H2Upstream::reset(int32_t stream_id) {
  auto it = sinks_.find(stream_id);
  if (closed_ || it == sinks_.end()) return;
  it->second.sink.reset();  // it is gone: no more callbacks for it
  nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
  schedule_flush();
}

void H2Upstream::retire() {
  going_away_ = true;
  if (sinks_.empty() && !closed_) {
    nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
    schedule_flush();
  }
}

void H2Upstream::arm_idle() {
  // Closed before the upstream's own keep-alive would close it under a new stream.
  idle_.expires_after(conn_->idle_timeout);
  idle_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec || self->closed_) return;
    if (!self->sinks_.empty()) return self->arm_idle();
    nghttp2_session_terminate_session(self->session_, NGHTTP2_NO_ERROR);
    self->going_away_ = true;
    self->flush();
  });
}

void H2Upstream::do_read() {
  conn_->socket.async_read_some(
      asio::buffer(in_.get(), kReadSize),
      [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
        if (self->closed_) return;
        if (ec) {
          spdlog::debug("h2 upstream {}: {}", self->conn_->key, ec.message());
          return self->fail_all(NGHTTP2_INTERNAL_ERROR);
        }
        self->in_nghttp2_ = true;
        const ssize_t rv = nghttp2_session_mem_recv(self->session_, self->in_.get(), n);
        self->in_nghttp2_ = false;
        if (rv < 0) {
          spdlog::debug("h2 upstream {}: bad HTTP/2: {}", self->conn_->key,
                        nghttp2_strerror(static_cast<int>(rv)));
          return self->fail_all(NGHTTP2_PROTOCOL_ERROR);
        }
        self->flush();
        if (!self->closed_) self->do_read();
      });
}

void H2Upstream::schedule_flush() {
  // Batched: everything the callers submit in this turn of the loop leaves in one write.
  if (flush_posted_ || in_nghttp2_) return;
  flush_posted_ = true;
  asio::post(io_, [self = shared_from_this()] {
    self->flush_posted_ = false;
    self->flush();
  });
}

void H2Upstream::flush() {
  if (in_nghttp2_ || writing_ || closed_) return;
  in_nghttp2_ = true;
  out_.clear();
  while (out_.size() < kMaxWriteBatch) {
    const uint8_t* data = nullptr;
    const ssize_t n = nghttp2_session_mem_send(session_, &data);
    if (n < 0) {
      in_nghttp2_ = false;
      return fail_all(NGHTTP2_INTERNAL_ERROR);
    }
    if (n == 0) break;
    out_.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
  in_nghttp2_ = false;
  if (out_.empty()) {
    if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_))
      fail_all(NGHTTP2_NO_ERROR);
    return;
  }
  writing_ = true;
  asio::async_write(conn_->socket, asio::buffer(out_),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      self->writing_ = false;
                      if (self->closed_) return;
                      if (ec) return self->fail_all(NGHTTP2_INTERNAL_ERROR);
                      self->flush();
                    });
}

void H2Upstream::fail_all(uint32_t error_code) {
  if (closed_) return;
  closed_ = true;
  idle_.cancel();
  boost::system::error_code ignored;
  conn_->socket.close();
  auto sinks = std::move(sinks_);
  sinks_.clear();
  for (auto& [id, p] : sinks)
    if (auto s = p.sink.lock())
      s->on_stream_end(error_code ? error_code : uint32_t{NGHTTP2_CANCEL});
}

int H2Upstream::on_header(int32_t stream_id, uint8_t, std::string_view name,
                          std::string_view value) {
  auto it = sinks_.find(stream_id);
  if (it == sinks_.end()) return 0;
  it->second.head.emplace_back(name, value);
  return 0;
}

int H2Upstream::on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags, uint8_t) {
  auto it = sinks_.find(stream_id);
  if (it == sinks_.end()) return 0;
  if (type != NGHTTP2_HEADERS) return 0;
  Pending& p = it->second;
  H2Fields fields = std::move(p.head);
  p.head.clear();
  auto sink = p.sink.lock();
  if (!sink) return 0;
  const bool end_stream = (flags & NGHTTP2_FLAG_END_STREAM) != 0;
  if (p.got_head) {
    sink->on_response_trailers(std::move(fields));
    return 0;
  }
  // An interim 1xx answer is not passed on; the final one follows.
  if (!fields.empty() && fields.front().first == ":status" &&
      fields.front().second.starts_with('1'))
    return 0;
  p.got_head = true;
  sink->on_response_head(std::move(fields), end_stream);
  return 0;
}

int H2Upstream::on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len) {
  auto it = sinks_.find(stream_id);
  auto sink = it == sinks_.end() ? nullptr : it->second.sink.lock();
  if (!sink) {
    nghttp2_session_consume(session_, stream_id, len);  // nobody reads it: keep windows open
    return 0;
  }
  sink->on_response_data(data, len);
  return 0;
}

int H2Upstream::on_stream_close(int32_t stream_id, uint32_t error_code) {
  auto it = sinks_.find(stream_id);
  if (it == sinks_.end()) return 0;
  auto sink = it->second.sink.lock();
  sinks_.erase(it);
  if (sink) sink->on_stream_end(error_code);
  // Going away (retired, or the upstream sent GOAWAY): the last stream closes the connection.
  if (going_away_ && sinks_.empty()) nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
  return 0;
}

long H2Upstream::pull(int32_t stream_id, uint8_t* buf, size_t len, uint32_t* flags) {
  auto it = sinks_.find(stream_id);
  auto sink = it == sinks_.end() ? nullptr : it->second.sink.lock();
  if (!sink) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets the stream
  bool eof = false;
  const size_t n = sink->pull_request_body(buf, len, &eof);
  if (eof) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (const H2Fields* trailers = sink->request_trailers(); trailers && !trailers->empty()) {
      // The trailers end the stream instead of the last DATA frame.
      const auto nva = to_nva(*trailers);
      if (nghttp2_submit_trailer(session_, stream_id, nva.data(), nva.size()) == 0)
        *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    }
  }
  if (n == 0 && !eof) return NGHTTP2_ERR_DEFERRED;
  return static_cast<long>(n);
}

}  // namespace weft
