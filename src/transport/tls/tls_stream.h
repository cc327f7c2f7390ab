// TlsStream: a TlsSocket as an Asio AsyncStream, for code written against asio::ssl::stream
// (coroutines, async_read, async_write, async_read_until).
//
// Why: asio::ssl::stream moves ciphertext through 17 KiB buffers, a read or write system call
// per TLS record. The relay carries 32 KiB QUIC datagrams (two records each) through two TLS
// legs, so that was four or more system calls per datagram at each end; TlsSocket gathers
// ciphertext into one write and reads up to 256 KiB per call.
//
// One reader and one writer may be active at once, as with any socket; not two of either.
#pragma once

#include <functional>
#include <memory>
#include <utility>

#include <boost/asio/async_result.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "transport/tls/tls_socket.h"

namespace weft {

class TlsStream {
 public:
  using executor_type = boost::asio::any_io_executor;
  using Role = TlsSocket::Role;

  TlsStream(boost::asio::ip::tcp::socket socket, SSL_CTX* ctx, Role role)
      : tls_(std::move(socket), ctx, role), handshake_guard_(tls_.socket().get_executor()) {}

  executor_type get_executor() { return tls_.socket().get_executor(); }
  SSL* native_handle() { return tls_.native_handle(); }
  boost::asio::ip::tcp::socket& socket() { return tls_.socket(); }
  // Closes the TCP connection; pending operations complete with operation_aborted.
  void close() { tls_.close(); }
  // OpenSSL's words for the last failure (handshake or record), empty if none.
  const std::string& error() const { return tls_.error(); }

  template <class Token>
  auto async_handshake(Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        [this](auto handler) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          // TlsSocket keeps its handshake handler in a member. Were that the handler's owner, a
          // coroutine waiting here that owns this stream would never be freed if its
          // io_context shut down first (asio::ssl::stream keeps the handler in the pending
          // operation instead). So a timer that never fires holds it as a pending operation,
          // destroyed with the io_context, and TlsSocket only a weak reference.
          handshake_guard_.expires_at(boost::asio::steady_timer::time_point::max());
          handshake_guard_.async_wait([h](const boost::system::error_code&) {});
          auto initiating = std::make_shared<bool>(true);
          tls_.async_handshake(
              [this, initiating, w = std::weak_ptr(h)](const boost::system::error_code& ec) {
                auto h = w.lock();
                if (!h) return;
                handshake_guard_.cancel();
                if (*initiating) return complete_later([h, ec] { (*h)(ec); });
                (*h)(ec);
              });
          *initiating = false;
        },
        token);
  }

  template <class MutableBuffers, class Token>
  auto async_read_some(const MutableBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, size_t)>(
        [this](auto handler, const MutableBuffers& b) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          // read_some semantics: filling the first non-empty buffer is enough.
          boost::asio::mutable_buffer into;
          for (auto it = boost::asio::buffer_sequence_begin(b);
               it != boost::asio::buffer_sequence_end(b) && into.size() == 0; ++it)
            into = *it;
          start_read(
              into, [h](boost::system::error_code ec, size_t n) { (*h)(ec, n); }, false);
        },
        token, buffers);
  }

  template <class ConstBuffers, class Token>
  auto async_write_some(const ConstBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, size_t)>(
        [this](auto handler, const ConstBuffers& b) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          size_t total = 0;
          for (auto it = boost::asio::buffer_sequence_begin(b);
               it != boost::asio::buffer_sequence_end(b); ++it) {
            const boost::asio::const_buffer piece = *it;
            if (piece.size() == 0) continue;
            if (!tls_.write(static_cast<const uint8_t*>(piece.data()), piece.size()))
              return complete_later([h] { (*h)(boost::asio::error::broken_pipe, 0); });
            total += piece.size();
          }
          if (total == 0) return complete_later([h] { (*h)({}, 0); });
          tls_.async_flush(
              [h, total](const boost::system::error_code& ec) { (*h)(ec, ec ? 0 : total); });
        },
        token, buffers);
  }

 private:
  using ReadDone = std::function<void(boost::system::error_code, size_t)>;

  // `in_handler`: called from a completion handler, so finishing at once is allowed; from the
  // initiating function it is not (the caller's frame is still on the stack).
  void start_read(boost::asio::mutable_buffer into, ReadDone done, bool in_handler) {
    const auto finish = [&](boost::system::error_code ec, size_t n) {
      if (in_handler) return done(ec, n);
      complete_later([done = std::move(done), ec, n] { done(ec, n); });
    };
    if (into.size() == 0) return finish({}, 0);
    const long n = tls_.read(static_cast<uint8_t*>(into.data()), into.size());
    if (n > 0) return finish({}, static_cast<size_t>(n));
    if (n < 0) {
      // A clean close_notify is the end of the stream; anything else is a failed connection.
      const bool clean = tls_.error().empty();
      return finish(clean ? boost::system::error_code(boost::asio::error::eof)
                          : boost::system::error_code(boost::asio::error::connection_aborted),
                    0);
    }
    tls_.async_fill([this, into, done = std::move(done)](const boost::system::error_code& ec) {
      if (ec) return done(ec, 0);
      start_read(into, done, true);
    });
  }

  template <class F>
  void complete_later(F&& f) {
    boost::asio::post(get_executor(), std::forward<F>(f));
  }

  TlsSocket tls_;
  boost::asio::steady_timer handshake_guard_;
};

}  // namespace weft
