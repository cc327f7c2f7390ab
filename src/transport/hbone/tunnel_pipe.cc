#include "transport/hbone/tunnel_pipe.h"

#include <cstring>

namespace weft {

namespace {
// Input buffer capacity kept between bursts; a larger one (a big response) is given back.
constexpr size_t kKeepInput = 256 * 1024;
}  // namespace

boost::system::error_code TunnelPipe::input_error() const {
  if (closed_) return boost::asio::error::bad_descriptor;
  if (finished_ && !tunnel_ok_ && !in_eof_) return boost::asio::error::connection_reset;
  return boost::asio::error::eof;
}

std::string_view TunnelPipe::buffered() const {
  return {reinterpret_cast<const char*>(in_.data()) + in_off_, in_.size() - in_off_};
}

void TunnelPipe::consumed(size_t n) {
  in_off_ += n;
  if (in_off_ == in_.size()) {
    in_off_ = 0;
    in_.clear();
    if (in_.capacity() > kKeepInput) std::vector<uint8_t>().swap(in_);
  }
  if (n && sink_) sink_->pipe_consumed(n);
}

void TunnelPipe::serve_pending_read() {
  if (!read_op_ || !readable_now()) return;
  auto op = std::move(read_op_);
  size_t n = 0;
  if (!read_bufs_.empty()) n = take_input(read_bufs_);  // empty: async_wait_readable
  const bool waiting_only = read_bufs_.empty();
  read_bufs_.clear();
  op->run(ex_, n || waiting_only ? boost::system::error_code() : input_error(), n);
}

void TunnelPipe::serve_pending_write() {
  if (!write_op_) return;
  auto op = std::move(write_op_);
  if (write_refused()) {
    write_bufs_.clear();
    return op->run(
        ex_, closed_ ? boost::asio::error::bad_descriptor : boost::asio::error::broken_pipe, 0);
  }
  const size_t n = put_output(write_bufs_, false);
  write_bufs_.clear();
  op->run(ex_, {}, n);
}

bool TunnelPipe::push(const uint8_t* data, size_t len) {
  if (closed_) return false;
  in_.insert(in_.end(), data, data + len);
  serve_pending_read();
  return true;
}

void TunnelPipe::push_eof() {
  in_eof_ = true;
  serve_pending_read();
}

size_t TunnelPipe::pull(uint8_t* buf, size_t len) {
  const size_t n = std::min(len, out_pending());
  if (n == 0) return 0;
  std::memcpy(buf, out_.data() + out_off_, n);
  advance_output(n);
  return n;
}

size_t TunnelPipe::transfer_to(TunnelPipe& dest, size_t max) {
  const size_t n = std::min(max, out_pending());
  if (n == 0 || !dest.push(out_.data() + out_off_, n)) return 0;
  advance_output(n);
  return n;
}

void TunnelPipe::advance_output(size_t n) {
  out_off_ += n;
  if (out_off_ == out_.size()) {
    out_.clear();
    out_off_ = 0;
  }
  if (out_pending() < kOutCapacity) serve_pending_write();
}

void TunnelPipe::tunnel_finished(bool ok) {
  if (finished_) return;
  finished_ = true;
  tunnel_ok_ = ok;
  sink_ = nullptr;
  serve_pending_read();
  serve_pending_write();
}

void TunnelPipe::shutdown_send() {
  if (out_eof_) return;
  out_eof_ = true;
  if (sink_) sink_->pipe_has_output();
}

void TunnelPipe::close() {
  if (closed_) return;
  const bool had_unread = in_.size() > in_off_;
  closed_ = true;
  out_eof_ = true;
  in_.clear();
  in_off_ = 0;
  cancel();
  if (auto* s = std::exchange(sink_, nullptr)) s->pipe_closed(had_unread);
}

void TunnelPipe::cancel() {
  if (auto op = std::move(read_op_)) {
    read_bufs_.clear();
    op->run(ex_, boost::asio::error::operation_aborted, 0);
  }
  if (auto op = std::move(write_op_)) {
    write_bufs_.clear();
    op->run(ex_, boost::asio::error::operation_aborted, 0);
  }
}

}  // namespace weft
