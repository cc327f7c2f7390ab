// TunnelPipe: the in-process end of an HBONE stream, for the proxy's own HTTP code. Where a
// socket pair used to sit between the HTTP layer and the tunnel (two syscalls and a wake-up per
// hop, per direction), the HTTP code now reads and writes this object as an Asio stream and the
// TunnelStream moves its bytes straight into and out of nghttp2.
//
// Semantics follow a stream socket so the HTTP code cannot tell the difference:
//  - reads return what has arrived, then EOF once the peer ended its side (or an error once the
//    tunnel was reset);
//  - writes are copied into a bounded buffer (backpressure: a write waits while it is full);
//  - shutdown_send() ends our side; close() ends it and refuses what still arrives, which
//    resets the stream as writing to a closed socket would.
// Single-threaded (the worker's); completions are posted, never run inside the initiating call.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/system/error_code.hpp>

namespace weft {

// What the pipe tells the tunnel side about the HTTP side's actions.
class TunnelPipeSink {
 public:
  virtual ~TunnelPipeSink() = default;
  virtual void pipe_has_output() = 0;        // bytes written or our side ended
  virtual void pipe_consumed(size_t n) = 0;  // the HTTP side read n bytes
  // The HTTP side is gone. `unread`: it left received bytes unread (a socket would reset).
  virtual void pipe_closed(bool unread) = 0;
};

class TunnelPipe {
 public:
  using executor_type = boost::asio::any_io_executor;
  static constexpr size_t kOutCapacity = 64 * 1024;

  explicit TunnelPipe(executor_type ex) : ex_(std::move(ex)) {}
  TunnelPipe(const TunnelPipe&) = delete;
  TunnelPipe& operator=(const TunnelPipe&) = delete;

  executor_type get_executor() const { return ex_; }

  template <class MutableBuffers, class Handler>
  void async_read_some(const MutableBuffers& buffers, Handler&& handler) {
    if (read_op_) return complete(std::move(handler), boost::asio::error::in_progress, 0);
    if (boost::asio::buffer_size(buffers) == 0) return complete(std::move(handler), {}, 0);
    if (readable_now()) {
      const size_t n = take_input(buffers);
      return complete(std::move(handler), n ? boost::system::error_code() : input_error(), n);
    }
    read_bufs_.assign(boost::asio::buffer_sequence_begin(buffers),
                      boost::asio::buffer_sequence_end(buffers));
    read_op_ = make_op(std::forward<Handler>(handler));
  }

  template <class ConstBuffers, class Handler>
  void async_write_some(const ConstBuffers& buffers, Handler&& handler) {
    if (write_op_) return complete(std::move(handler), boost::asio::error::in_progress, 0);
    if (write_refused()) return complete(std::move(handler), boost::asio::error::broken_pipe, 0);
    if (boost::asio::buffer_size(buffers) == 0) return complete(std::move(handler), {}, 0);
    if (out_pending() < kOutCapacity) {
      const size_t n = put_output(buffers, true);
      return complete(std::move(handler), {}, n);
    }
    write_bufs_.assign(boost::asio::buffer_sequence_begin(buffers),
                       boost::asio::buffer_sequence_end(buffers));
    write_op_ = make_op(std::forward<Handler>(handler));
  }

  // Synchronous write of what fits now (would_block when full), for the rare small direct
  // write (an interim 100 Continue).
  template <class ConstBuffers>
  size_t write_some(const ConstBuffers& buffers, boost::system::error_code& ec) {
    ec = {};
    if (write_refused()) {
      ec = boost::asio::error::broken_pipe;
      return 0;
    }
    if (out_pending() >= kOutCapacity) {
      ec = boost::asio::error::would_block;
      return 0;
    }
    return put_output(buffers, true);
  }

  // --- the HTTP side ---
  void shutdown_send();
  void close();
  void cancel();  // pending reads and writes complete with operation_aborted
  bool is_open() const { return !closed_; }
  // Nothing unexpected arrived and the tunnel is still up: safe to send another request on.
  bool reusable() const { return !closed_ && !finished_ && !in_eof_ && in_.size() == in_off_; }
  // Bytes received and not yet read (a peek for protocol detection).
  std::string_view buffered() const;
  bool input_ended() const { return in_eof_ || finished_; }
  // Completes once bytes are buffered or the input ended.
  template <class Handler>
  void async_wait_readable(Handler&& handler) {
    if (readable_now()) return complete(std::move(handler), {}, 0);
    if (read_op_) return complete(std::move(handler), boost::asio::error::in_progress, 0);
    read_bufs_.clear();
    read_op_ = make_op(std::forward<Handler>(handler));
  }

  // --- the tunnel side (TunnelStream) ---
  void attach(TunnelPipeSink* sink) { sink_ = sink; }
  // DATA from the peer. False once the HTTP side closed: the stream must be reset.
  bool push(const uint8_t* data, size_t len);
  void push_eof();
  // Copies written bytes for nghttp2; 0 when there are none.
  size_t pull(uint8_t* buf, size_t len);
  // Moves up to `max` written bytes into `dest`'s input (a PipePair); 0 when none or refused.
  size_t transfer_to(TunnelPipe& dest, size_t max);
  bool output_ended() const { return out_eof_ && out_.size() == out_off_; }
  // The tunnel is over: `ok` ends the input after what is buffered; otherwise reads fail with
  // connection_reset once it is drained. Writes fail from now on.
  void tunnel_finished(bool ok);

 private:
  struct Op {
    virtual ~Op() = default;
    virtual void run(executor_type& ex, boost::system::error_code ec, size_t n) = 0;
  };
  template <class Handler>
  struct OpFor final : Op {
    explicit OpFor(Handler h) : handler(std::move(h)) {}
    void run(executor_type& ex, boost::system::error_code ec, size_t n) override {
      boost::asio::post(ex, [h = std::move(handler), ec, n]() mutable { h(ec, n); });
    }
    Handler handler;
  };
  template <class Handler>
  static std::unique_ptr<Op> make_op(Handler&& h) {
    return std::make_unique<OpFor<std::decay_t<Handler>>>(std::forward<Handler>(h));
  }
  template <class Handler>
  void complete(Handler&& h, boost::system::error_code ec, size_t n) {
    boost::asio::post(ex_, [h = std::forward<Handler>(h), ec, n]() mutable { h(ec, n); });
  }

  bool readable_now() const { return in_.size() > in_off_ || in_eof_ || finished_ || closed_; }
  bool write_refused() const { return closed_ || out_eof_ || finished_; }
  boost::system::error_code input_error() const;

  template <class MutableBuffers>
  size_t take_input(const MutableBuffers& buffers) {
    const size_t n = boost::asio::buffer_copy(
        buffers, boost::asio::const_buffer(in_.data() + in_off_, in_.size() - in_off_));
    consumed(n);
    return n;
  }
  size_t out_pending() const { return out_.size() - out_off_; }
  // `notify`: false when called from inside nghttp2's data callback, which reads on anyway.
  template <class ConstBuffers>
  size_t put_output(const ConstBuffers& buffers, bool notify) {
    if (out_off_ > 0) {
      out_.erase(out_.begin(), out_.begin() + static_cast<std::ptrdiff_t>(out_off_));
      out_off_ = 0;
    }
    const size_t n = std::min(kOutCapacity - std::min(kOutCapacity, out_.size()),
                              boost::asio::buffer_size(buffers));
    const size_t at = out_.size();
    out_.resize(at + n);
    boost::asio::buffer_copy(boost::asio::mutable_buffer(out_.data() + at, n), buffers);
    if (notify && sink_) sink_->pipe_has_output();
    return n;
  }
  void consumed(size_t n);
  void advance_output(size_t n);
  void serve_pending_read();
  void serve_pending_write();

  executor_type ex_;
  TunnelPipeSink* sink_ = nullptr;

  std::vector<uint8_t> in_;  // from the tunnel, not yet read
  size_t in_off_ = 0;
  bool in_eof_ = false;
  std::vector<uint8_t> out_;  // written, not yet taken by nghttp2
  size_t out_off_ = 0;
  bool out_eof_ = false;

  bool closed_ = false;
  bool finished_ = false;
  bool tunnel_ok_ = true;

  std::unique_ptr<Op> read_op_;
  std::vector<boost::asio::mutable_buffer> read_bufs_;
  std::unique_ptr<Op> write_op_;
  std::vector<boost::asio::const_buffer> write_bufs_;
};

}  // namespace weft
