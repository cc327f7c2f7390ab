#include "transport/hbone/h2_connection.h"

#include <nghttp2/nghttp2.h>
#include <spdlog/spdlog.h>

#include "transport/hbone/h2_options.h"
#include "transport/hbone/tunnel_stream.h"

namespace weft {

namespace {

constexpr size_t kReadSize = 64 * 1024;
constexpr size_t kMaxWriteBatch = 256 * 1024;
constexpr size_t kRecordPayload = 16 * 1024;  // TLS's largest record

H2Connection* self(void* user_data) { return static_cast<H2Connection*>(user_data); }

int cb_begin_headers(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  return self(user)->on_begin_headers(frame->hd.stream_id);
}

int cb_header(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
              const uint8_t* value, size_t valuelen, uint8_t, void* user) {
  return self(user)->on_header(frame->hd.stream_id, {reinterpret_cast<const char*>(name), namelen},
                               {reinterpret_cast<const char*>(value), valuelen});
}

int cb_frame_recv(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  const int category = frame->hd.type == NGHTTP2_HEADERS ? frame->headers.cat : -1;
  return self(user)->on_frame_recv(frame->hd.stream_id, frame->hd.type, frame->hd.flags, category);
}

int cb_data_chunk(nghttp2_session*, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                  void* user) {
  return self(user)->on_data_chunk(stream_id, data, len);
}

int cb_stream_close(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* user) {
  return self(user)->on_stream_close(stream_id, error_code);
}

int cb_frame_send(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  // nghttp2 answers a peer's protocol violation with GOAWAY carrying an error code.
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR)
    self(user)->on_protocol_error(nghttp2_http2_strerror(frame->goaway.error_code));
  return 0;
}

ssize_t cb_read_length(nghttp2_session*, uint8_t, int32_t, int32_t session_window,
                       int32_t stream_window, uint32_t remote_max_frame_size, void*) {
  // As large as the peer accepts and the windows allow: fewer frames, fewer callbacks.
  return std::min<ssize_t>(
      {session_window, stream_window, static_cast<ssize_t>(remote_max_frame_size)});
}

ssize_t cb_read_data(nghttp2_session*, int32_t, uint8_t* buf, size_t len, uint32_t* flags,
                     nghttp2_data_source* source, void*) {
  return static_cast<TunnelStream*>(source->ptr)->read_for_h2(buf, len, flags);
}

nghttp2_nv header(std::string_view name, std::string_view value) {
  return {const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(name.data())),
          const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(value.data())), name.size(),
          value.size(), NGHTTP2_NV_FLAG_NONE};
}

}  // namespace

H2Connection::H2Connection(Role role, std::unique_ptr<Tls> tls, std::string peer_identity,
                           Metrics& metrics, Hooks hooks, Settings settings)
    : role_(role),
      tls_(std::move(tls)),
      peer_identity_(std::move(peer_identity)),
      metrics_(metrics),
      hooks_(std::move(hooks)),
      settings_(settings),
      idle_timer_(tls_->socket().get_executor()) {
  nghttp2_session_callbacks* cbs = nullptr;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, cb_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, cb_frame_send);
  nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, cb_read_length);
  // (WINDOW_UPDATE only after bytes reach the TCP side: that is the backpressure.)
  nghttp2_option* opt = new_h2_options();
  if (role_ == Role::client)
    nghttp2_session_client_new2(&session_, cbs, this, opt);
  else
    nghttp2_session_server_new2(&session_, cbs, this, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  metrics_.hbone_connections_active.inc();
}

H2Connection::~H2Connection() {
  nghttp2_session_del(session_);
  metrics_.hbone_connections_active.dec();
}

void H2Connection::start() {
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, settings_.max_concurrent_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, settings_.stream_window},
      {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, settings_.max_frame_size},
      kNoRfc7540Priorities,
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},  // (a client's setting: last, left out by a server)
  };
  nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, iv, role_ == Role::client ? 5 : 4);
  nghttp2_session_set_local_window_size(session_, NGHTTP2_FLAG_NONE, 0,
                                        static_cast<int32_t>(settings_.connection_window));
  in_.reset(new uint8_t[kReadSize]);
  update_idle_timer();
  flush();
  do_read();
}

bool H2Connection::accepting_streams() const {
  if (closed_ || retired_) return false;
  if (!nghttp2_session_check_request_allowed(session_)) return false;
  const uint32_t remote_max =
      nghttp2_session_get_remote_settings(session_, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
  return streams_.size() < std::min(remote_max, settings_.max_concurrent_streams);
}

bool H2Connection::submit_connect(const std::string& authority,
                                  const std::shared_ptr<TunnelStream>& stream) {
  if (!accepting_streams()) return false;
  const nghttp2_nv hdrs[] = {header(":method", "CONNECT"), header(":authority", authority)};
  nghttp2_data_provider prd{};
  prd.source.ptr = stream.get();
  prd.read_callback = cb_read_data;
  const int32_t id = nghttp2_submit_request(session_, nullptr, hdrs, 2, &prd, nullptr);
  if (id < 0) return false;
  streams_[id] = stream;
  stream->attach(shared_from_this(), id);
  metrics_.hbone_streams_active.inc();
  update_idle_timer();
  flush();
  return true;
}

void H2Connection::accept_stream(int32_t stream_id) {
  auto stream = find(stream_id);
  if (!stream || closed_) return;
  const nghttp2_nv hdrs[] = {header(":status", "200")};
  nghttp2_data_provider prd{};
  prd.source.ptr = stream.get();
  prd.read_callback = cb_read_data;
  nghttp2_submit_response(session_, stream_id, hdrs, 1, &prd);
  flush();
}

void H2Connection::reject_stream(int32_t stream_id, int status) {
  if (closed_) return;
  const std::string code = std::to_string(status);
  const nghttp2_nv hdrs[] = {header(":status", code)};
  metrics_.hbone_requests_rejected.inc();
  // No body: the response ends the stream, and nghttp2 resets it if the client keeps sending.
  nghttp2_submit_response(session_, stream_id, hdrs, 1, nullptr);
  flush();
}

void H2Connection::resume(int32_t stream_id) {
  if (closed_) return;
  nghttp2_session_resume_data(session_, stream_id);
  flush();
}

void H2Connection::consume(int32_t stream_id, size_t n) {
  if (closed_) return;
  // Also credits the connection window when the stream is already gone.
  nghttp2_session_consume(session_, stream_id, n);
  flush();
}

void H2Connection::reset(int32_t stream_id, uint32_t error_code) {
  if (closed_) return;
  nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, stream_id, error_code);
  flush();
}

void H2Connection::retire() {
  if (retired_ || closed_) return;
  retired_ = true;
  if (role_ == Role::server)
    nghttp2_submit_goaway(session_, NGHTTP2_FLAG_NONE,
                          nghttp2_session_get_last_proc_stream_id(session_), NGHTTP2_NO_ERROR,
                          nullptr, 0);
  if (streams_.empty()) nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
  flush();
}

std::shared_ptr<TunnelStream> H2Connection::find(int32_t stream_id) {
  auto it = streams_.find(stream_id);
  return it == streams_.end() ? nullptr : it->second;
}

void H2Connection::update_idle_timer() {
  if (settings_.idle_timeout.count() == 0 || closed_) return;
  if (!streams_.empty()) {
    idle_timer_.cancel();
    return;
  }
  idle_timer_.expires_after(settings_.idle_timeout);
  idle_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec || self->closed_ || !self->streams_.empty()) return;
    spdlog::debug("hbone: closing idle connection to {}", self->peer_identity_);
    self->retire();
  });
}

void H2Connection::flush() {
  // nghttp2 is not reentrant: output produced inside a callback is sent after it returns.
  if (in_nghttp2_ || writing_ || closed_) return;
  in_nghttp2_ = true;
  // nghttp2 hands out one frame per mem_send. Frames are gathered into records of up to
  // kRecordPayload: with a record per frame, a batch of small DATA and WINDOW_UPDATE frames
  // cost an AEAD seal, 22 bytes of record overhead and (SSL_MODE_RELEASE_BUFFERS) a zeroed
  // 17 KiB buffer allocated and freed for each one.
  const auto seal = [this](const uint8_t* data, size_t n) {
    if (tls_->write(data, n)) return true;
    in_nghttp2_ = false;
    terminate("tls write: " + tls_->error());
    return false;
  };
  // One scratch buffer per thread, borrowed for the call (a nested flush on another
  // connection would borrow an empty one), so idle connections hold none.
  static thread_local std::vector<uint8_t> scratch;
  std::vector<uint8_t> plain;
  plain.swap(scratch);
  plain.clear();
  struct GiveBack {
    std::vector<uint8_t>& plain;
    ~GiveBack() {
      if (plain.capacity() <= 4 * kRecordPayload) plain.swap(scratch);
    }
  } give_back{plain};
  size_t produced = 0;
  while (produced < kMaxWriteBatch) {
    const uint8_t* data = nullptr;
    const ssize_t n = nghttp2_session_mem_send(session_, &data);
    if (n < 0) {
      in_nghttp2_ = false;
      terminate(std::string("http2 send error: ") + nghttp2_strerror(static_cast<int>(n)));
      return;
    }
    if (n == 0) break;
    const auto len = static_cast<size_t>(n);
    produced += len;
    if (len >= kRecordPayload) {
      // A full record's worth: encrypt straight from nghttp2's buffer (valid until the next
      // mem_send), no copy, after what was gathered before it.
      if (!plain.empty() && !seal(plain.data(), plain.size())) return;
      plain.clear();
      if (!seal(data, len)) return;
      continue;
    }
    plain.insert(plain.end(), data, data + len);
    if (plain.size() >= kRecordPayload) {
      if (!seal(plain.data(), plain.size())) return;
      plain.clear();
    }
  }
  if (!plain.empty() && !seal(plain.data(), plain.size())) return;
  in_nghttp2_ = false;
  if (!tls_->has_output()) {
    if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_))
      terminate("");
    return;
  }
  writing_ = true;
  tls_->async_flush([self = shared_from_this()](const boost::system::error_code& ec) {
    self->writing_ = false;
    if (self->closed_) return;
    if (ec) return self->terminate("tls write: " + ec.message());
    self->flush();
  });
}

void H2Connection::do_read() {
  for (;;) {
    const long n = tls_->read(in_.get(), kReadSize);
    if (n == 0) break;
    if (n < 0) return on_read_error();
    in_nghttp2_ = true;
    const ssize_t rv = nghttp2_session_mem_recv(session_, in_.get(), static_cast<size_t>(n));
    in_nghttp2_ = false;
    if (rv < 0) {
      metrics_.hbone_protocol_errors.inc();
      return terminate(std::string("bad http2 from peer: ") +
                       nghttp2_strerror(static_cast<int>(rv)));
    }
    if (closed_) return;
  }
  flush();
  if (closed_) return;
  tls_->async_fill([self = shared_from_this()](const boost::system::error_code& ec) {
    if (self->closed_) return;
    if (ec) return self->terminate("tls read: " + ec.message());
    self->do_read();
  });
}

void H2Connection::on_read_error() {
  // close_notify or a bare FIN is an ordinary end; anything else (bad records, garbage after
  // the handshake) is a protocol error worth counting.
  const std::string& why = tls_->error();
  const bool clean = why.empty() || why.find("truncated") != std::string::npos;
  if (!clean) metrics_.hbone_protocol_errors.inc();
  terminate(clean ? "" : "tls read: " + why);
}

void H2Connection::terminate(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  if (!why.empty()) spdlog::debug("hbone: connection with '{}' closed: {}", peer_identity_, why);
  idle_timer_.cancel();
  boost::system::error_code ignored;
  tls_->socket().shutdown(boost::asio::ip::tcp::socket::shutdown_both, ignored);
  tls_->close();
  auto streams = std::move(streams_);
  streams_.clear();
  for (auto& [id, s] : streams) {
    metrics_.hbone_streams_active.dec();
    s->on_h2_closed(NGHTTP2_CONNECT_ERROR);
  }
  if (hooks_.on_closed) hooks_.on_closed(this);
}

void H2Connection::on_protocol_error(const char* what) {
  metrics_.hbone_protocol_errors.inc();
  spdlog::debug("hbone: protocol error with '{}': {}", peer_identity_, what);
}

int H2Connection::on_begin_headers(int32_t stream_id) {
  headers_[stream_id] = {};
  return 0;
}

int H2Connection::on_header(int32_t stream_id, std::string_view name, std::string_view value) {
  auto it = headers_.find(stream_id);
  if (it == headers_.end()) return 0;  // trailers or an unknown stream: ignored
  auto& h = it->second;
  if (name == ":method")
    h.method = value;
  else if (name == ":authority")
    h.authority = value;
  else if (name == ":status")
    h.status = value;
  else if (name == ":scheme")
    h.scheme = value;
  else if (name == ":path")
    h.path = value;
  else if (name == ":protocol")
    h.protocol = value;
  return 0;
}

int H2Connection::on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags,
                                int headers_category) {
  if (type == NGHTTP2_HEADERS) {
    auto it = headers_.find(stream_id);
    if (it != headers_.end()) {
      PendingHeaders h = std::move(it->second);
      headers_.erase(it);
      if (role_ == Role::server && headers_category == NGHTTP2_HCAT_REQUEST) {
        if (h.method != "CONNECT" || h.authority.empty() || !h.protocol.empty()) {
          reject_stream(stream_id, 400);
        } else if (retired_) {
          reject_stream(stream_id, 503);
        } else {
          ConnectDecision d = hooks_.on_connect(shared_from_this(), stream_id, h.authority);
          if (d.stream) {
            streams_[stream_id] = d.stream;
            d.stream->attach(shared_from_this(), stream_id);
            metrics_.hbone_streams_active.inc();
            update_idle_timer();
          } else {
            reject_stream(stream_id, d.status ? d.status : 503);
          }
        }
      } else if (role_ == Role::client && headers_category == NGHTTP2_HCAT_RESPONSE) {
        if (auto s = find(stream_id)) {
          const int status = h.status.size() == 3 ? std::atoi(h.status.c_str()) : 0;
          s->on_response(status);  // a refusal resets the stream from inside the stream
        }
      }
    }
  }
  if ((type == NGHTTP2_DATA || type == NGHTTP2_HEADERS) && (flags & NGHTTP2_FLAG_END_STREAM)) {
    if (auto s = find(stream_id)) s->on_h2_end_stream();
  }
  return 0;
}

int H2Connection::on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len) {
  if (auto s = find(stream_id); s && s->accepting_data()) {
    s->on_h2_data(data, len);
  } else {
    nghttp2_session_consume(session_, stream_id, len);  // keep the connection window open
  }
  return 0;
}

int H2Connection::on_stream_close(int32_t stream_id, uint32_t error_code) {
  headers_.erase(stream_id);
  auto it = streams_.find(stream_id);
  if (it == streams_.end()) return 0;
  auto stream = std::move(it->second);
  streams_.erase(it);
  metrics_.hbone_streams_active.dec();
  stream->on_h2_closed(error_code);
  if (streams_.empty()) {
    if (retired_) nghttp2_session_terminate_session(session_, NGHTTP2_NO_ERROR);
    update_idle_timer();
  }
  return 0;
}

}  // namespace weft
