#include "transport/hbone/tunnel_stream.h"

#include <nghttp2/nghttp2.h>
#include <spdlog/spdlog.h>
#include <utility>

#include <boost/asio/write.hpp>

#include "transport/hbone/h2_connection.h"

namespace weft {

namespace asio = boost::asio;

namespace {
constexpr size_t kKeepBuffer = 1024 * 1024;
}

TunnelStream::TunnelStream(asio::ip::tcp::socket socket, std::shared_ptr<TcpCounters> counters,
                           bool tcp_is_downstream, Metrics& metrics, Finished finished)
    : socket_(std::move(socket)),
      counters_(std::move(counters)),
      tcp_is_downstream_(tcp_is_downstream),
      metrics_(metrics),
      finished_(std::move(finished)) {
  metrics_.downstream_connections_active.inc();
  if (counters_) counters_->opened.fetch_add(1, std::memory_order_relaxed);
}

TunnelStream::TunnelStream(std::shared_ptr<TunnelPipe> pipe, std::shared_ptr<TcpCounters> counters,
                           bool tcp_is_downstream, Metrics& metrics, Finished finished)
    : TunnelStream(asio::ip::tcp::socket(pipe->get_executor()), std::move(counters),
                   tcp_is_downstream, metrics, std::move(finished)) {
  pipe_ = std::move(pipe);
  pipe_->attach(this);
}

TunnelStream::~TunnelStream() {
  if (pipe_) pipe_->tunnel_finished(false);  // idempotent; detaches us
  metrics_.downstream_connections_active.dec();
  if (counters_) counters_->closed.fetch_add(1, std::memory_order_relaxed);
}

void TunnelStream::attach(std::shared_ptr<H2Connection> conn, int32_t stream_id) {
  peer_identity_ = conn->peer_identity();
  conn_ = std::move(conn);
  stream_id_ = stream_id;
}

void TunnelStream::on_response(int status) {
  if (status == 200) {
    start_relay();
    return;
  }
  // 401: the peer's policy denied us; 400: it does not know the target; 503: no upstream.
  fail("upstream_refused_" + std::to_string(status));
}

void TunnelStream::start_relay() {
  if (done_ || relaying_) return;
  relaying_ = true;
  if (on_open_) std::exchange(on_open_, nullptr)("");
  if (pipe_) {
    if (conn_) conn_->resume(stream_id_);
    return;
  }
  if (!prefix_.empty() && prefix_.size() <= BufferPool::kBufferSize) {
    // Served like a first read; the socket is read once nghttp2 has taken it.
    rbuf_ = BufferPool::local().take();
    std::memcpy(rbuf_.get(), prefix_.data(), prefix_.size());
    rlen_ = prefix_.size();
    roff_ = 0;
    from_tcp_ += rlen_;
    prefix_.clear();
    if (conn_) conn_->resume(stream_id_);
  } else {
    arm_tcp_read();
  }
  if (!pending_.empty()) write_to_tcp();  // data that arrived before the tunnel was up
}

void TunnelStream::arm_tcp_read() {
  if (pipe_ || reading_ || tcp_eof_ || done_ || !relaying_) return;
  reading_ = true;
  socket_.async_wait(asio::socket_base::wait_read,
                     [self = shared_from_this()](const boost::system::error_code& ec) {
                       self->on_tcp_readable(ec);
                     });
}

void TunnelStream::on_tcp_readable(const boost::system::error_code& wait_ec) {
  reading_ = false;
  if (done_) return;
  if (wait_ec) return fail("downstream_read_error");
  if (!rbuf_) rbuf_ = BufferPool::local().take();
  boost::system::error_code ec;
  const size_t n = socket_.read_some(asio::buffer(rbuf_.get(), BufferPool::kBufferSize), ec);
  if (ec == asio::error::would_block || ec == asio::error::try_again) {
    arm_tcp_read();
    return;
  }
  if (ec == asio::error::eof) {
    tcp_eof_ = true;
    rbuf_.reset();
  } else if (ec) {
    // The TCP side reset: tell the peer the tunnel broke rather than pretending a clean close.
    return fail(tcp_is_downstream_ ? "downstream_reset" : "upstream_reset");
  } else {
    rlen_ = n;
    roff_ = 0;
    count_from_tcp(n);
  }
  if (conn_) conn_->resume(stream_id_);
}

void TunnelStream::count_from_tcp(size_t n) {
  from_tcp_ += n;
  if (counters_) {
    auto& c = tcp_is_downstream_ ? counters_->received_bytes : counters_->sent_bytes;
    c.fetch_add(n, std::memory_order_relaxed);
  }
}

void TunnelStream::count_to_tcp(size_t n) {
  to_tcp_ += n;
  if (counters_) {
    auto& c = tcp_is_downstream_ ? counters_->sent_bytes : counters_->received_bytes;
    c.fetch_add(n, std::memory_order_relaxed);
  }
}

long TunnelStream::read_for_h2(uint8_t* buf, size_t len, uint32_t* flags) {
  if (pipe_) {
    if (const size_t n = pipe_->pull(buf, len)) {
      count_from_tcp(n);
      return static_cast<long>(n);
    }
    if (!pipe_->output_ended()) return NGHTTP2_ERR_DEFERRED;
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    return 0;
  }
  if (rlen_ > roff_) {
    const size_t n = std::min(len, rlen_ - roff_);
    std::memcpy(buf, rbuf_.get() + roff_, n);
    roff_ += n;
    if (roff_ == rlen_) {
      rlen_ = roff_ = 0;
      arm_tcp_read();  // keep the buffer: the next read reuses it
    }
    return static_cast<long>(n);
  }
  if (tcp_eof_) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    return 0;
  }
  // Nothing read yet; an idle stream gives its buffer back to the pool.
  rbuf_.reset();
  return NGHTTP2_ERR_DEFERRED;
}

void TunnelStream::on_h2_data(const uint8_t* data, size_t len) {
  if (pipe_) {
    if (done_) return;
    if (!pipe_->push(data, len))  // the HTTP side closed: as a write to a closed socket
      fail(tcp_is_downstream_ ? "downstream_write_error" : "upstream_write_error");
    return;
  }
  pending_.insert(pending_.end(), data, data + len);
  if (relaying_) write_to_tcp();
}

void TunnelStream::write_to_tcp() {
  if (writing_ || done_) return;
  if (pending_.empty()) {
    if (h2_eof_ && !tcp_write_shut_) {
      tcp_write_shut_ = true;
      boost::system::error_code ignored;
      socket_.shutdown(asio::ip::tcp::socket::shutdown_send, ignored);  // pass the half-close on
    }
    maybe_finish();
    return;
  }
  std::swap(pending_, inflight_);
  writing_ = true;
  asio::async_write(socket_, asio::buffer(inflight_),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                      self->writing_ = false;
                      if (self->done_) return;
                      if (ec) {
                        return self->fail(self->tcp_is_downstream_ ? "downstream_write_error"
                                                                   : "upstream_write_error");
                      }
                      self->count_to_tcp(n);
                      self->inflight_.clear();
                      // Keep a moderate buffer for the next burst (freeing and re-faulting pages
                      // per write costs more than the copy); drop an outsized one.
                      if (self->inflight_.capacity() > kKeepBuffer)
                        std::vector<uint8_t>().swap(self->inflight_);
                      if (self->conn_) self->conn_->consume(self->stream_id_, n);
                      self->write_to_tcp();
                    });
}

void TunnelStream::on_h2_end_stream() {
  h2_eof_ = true;
  if (pipe_) {
    pipe_->push_eof();
    maybe_finish();
    return;
  }
  if (relaying_) write_to_tcp();
}

void TunnelStream::on_h2_closed(uint32_t error_code) {
  h2_closed_ = true;
  if (error_code != NGHTTP2_NO_ERROR) {
    // Reset or connection lost: whatever was not yet written is lost too, so close now.
    if (result_ == "ok")
      result_ = error_code == NGHTTP2_CONNECT_ERROR ? "tunnel_broken" : "tunnel_reset";
    fail(result_);
    return;
  }
  maybe_finish();
}

void TunnelStream::maybe_finish() {
  if (done_) return;
  // Done when the h2 stream is closed (both END_STREAMs exchanged) and every byte it carried
  // has been written to the TCP side.
  if (h2_closed_ && !writing_ && pending_.empty()) finish(result_);
}

void TunnelStream::fail(const std::string& result, bool reset_peer) {
  if (done_) return;
  if (result_ == "ok") result_ = result;
  if (reset_peer && conn_ && !h2_closed_) conn_->reset(stream_id_, NGHTTP2_CONNECT_ERROR);
  finish(result_);
}

void TunnelStream::finish(const std::string& result) {
  if (done_) return;
  done_ = true;
  boost::system::error_code ignored;
  socket_.close(ignored);
  if (pipe_) pipe_->tunnel_finished(result == "ok");
  rbuf_.reset();
  if (on_open_) std::exchange(on_open_, nullptr)(result);
  auto conn = std::move(conn_);
  if (finished_) {
    auto f = std::move(finished_);
    f(*this, result);
  }
}

// The pipe holds only a plain pointer to us, and the connection's map may hold the last
// reference: sending (resume, consume, reset) can close the stream and drop it while we are
// still inside. Each callback keeps us alive until it returns.
void TunnelStream::pipe_has_output() {
  auto self = shared_from_this();
  if (conn_ && relaying_ && !done_) conn_->resume(stream_id_);
}

void TunnelStream::pipe_consumed(size_t n) {
  auto self = shared_from_this();
  count_to_tcp(n);
  if (conn_) conn_->consume(stream_id_, n);
}

void TunnelStream::pipe_closed(bool unread) {
  auto self = shared_from_this();
  if (done_) return;
  // As closing a socket: unread bytes reset the stream; otherwise our side ends after what
  // was written, and whatever the peer still sends resets it (on_h2_data).
  if (unread) return fail(tcp_is_downstream_ ? "downstream_reset" : "upstream_reset");
  if (conn_ && relaying_) conn_->resume(stream_id_);
  maybe_finish();
}

}  // namespace weft
