// ByteStream: what the L7 code reads and writes — a TCP socket (an app, a direct endpoint) or
// the in-process end of an HBONE stream (TunnelPipe). Both are Asio streams, so Beast and the
// HTTP/2 codecs run on either without knowing which.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include <boost/asio/async_result.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "transport/hbone/tunnel_pipe.h"

namespace weft {

class ByteStream {
 public:
  using executor_type = boost::asio::any_io_executor;
  using Signature = void(boost::system::error_code, size_t);

  ByteStream(boost::asio::ip::tcp::socket socket) : tcp_(std::move(socket)) {}  // NOLINT
  ByteStream(std::shared_ptr<TunnelPipe> pipe)                                  // NOLINT
      : tcp_(pipe->get_executor()), pipe_(std::move(pipe)) {}
  ByteStream(ByteStream&&) = default;
  ByteStream& operator=(ByteStream&& other) {
    if (this != &other) {
      close_pipe();
      tcp_ = std::move(other.tcp_);
      pipe_ = std::move(other.pipe_);
    }
    return *this;
  }
  // Dropping the stream closes it, as destroying a socket closes its descriptor (the tunnel
  // holds the pipe too and would otherwise never see the end).
  ~ByteStream() { close_pipe(); }

  executor_type get_executor() { return tcp_.get_executor(); }

  template <class MutableBuffers, class Token>
  auto async_read_some(const MutableBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, const MutableBuffers& b) {
          if (pipe_)
            pipe_->async_read_some(b, std::move(handler));
          else
            tcp_.async_read_some(b, std::move(handler));
        },
        token, buffers);
  }
  template <class ConstBuffers, class Token>
  auto async_write_some(const ConstBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, const ConstBuffers& b) {
          if (pipe_)
            pipe_->async_write_some(b, std::move(handler));
          else
            tcp_.async_write_some(b, std::move(handler));
        },
        token, buffers);
  }
  template <class ConstBuffers>
  size_t write_some(const ConstBuffers& buffers, boost::system::error_code& ec) {
    return pipe_ ? pipe_->write_some(buffers, ec) : tcp_.write_some(buffers, ec);
  }

  // The TCP socket: to connect it or set options. Unused (never opened) for a pipe.
  boost::asio::ip::tcp::socket& tcp() { return tcp_; }
  const std::shared_ptr<TunnelPipe>& pipe() const { return pipe_; }

  void shutdown_send() {
    boost::system::error_code ignored;
    if (pipe_)
      pipe_->shutdown_send();
    else
      tcp_.shutdown(boost::asio::ip::tcp::socket::shutdown_send, ignored);
  }
  void cancel() {
    boost::system::error_code ignored;
    if (pipe_)
      pipe_->cancel();
    else
      tcp_.cancel(ignored);
  }
  void close() {
    boost::system::error_code ignored;
    if (pipe_) pipe_->close();
    tcp_.close(ignored);
  }
  bool is_open() const { return pipe_ ? pipe_->is_open() : tcp_.is_open(); }
  // The peer's IP, or "" for a pipe (the caller knows the tunnel's peer).
  std::string remote_ip() const {
    boost::system::error_code ec;
    if (pipe_) return "";
    auto ep = tcp_.remote_endpoint(ec);
    return ec ? "" : ep.address().to_string();
  }

 private:
  void close_pipe() {
    if (pipe_) pipe_->close();
  }

  boost::asio::ip::tcp::socket tcp_;
  std::shared_ptr<TunnelPipe> pipe_;
};

}  // namespace weft
