// TlsStream under coroutines: what the relay's server and clients rely on.
#include <gtest/gtest.h>

#include <openssl/ssl.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <memory>

#include "transport/tls/tls_stream.h"

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace weft {
namespace {

// A coroutine waiting for a handshake owns the stream (the relay client's does, through its
// owner). When the io_context goes away first — a process shutting down — all of it must be
// freed: the handshake's handler may not be kept alive by the stream it owns.
TEST(TlsStream, AHandshakeCutShortByShutdownLeavesNothingBehind) {
  asio::io_context peer_io;  // never run: the kernel accepts, nothing answers the ClientHello
  tcp::acceptor silent(peer_io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  ASSERT_NE(ctx, nullptr);

  auto io = std::make_unique<asio::io_context>();
  tcp::socket socket(*io);
  socket.connect(silent.local_endpoint());
  struct Owner {
    std::shared_ptr<TlsStream> stream;
  };
  auto owner = std::make_shared<Owner>();
  owner->stream = std::make_shared<TlsStream>(std::move(socket), ctx, TlsStream::Role::client);
  SSL_CTX_free(ctx);  // the SSL object holds its own reference
  bool finished = false;
  asio::co_spawn(
      *io,
      [owner, &finished]() -> asio::awaitable<void> {
        boost::system::error_code ec;
        co_await owner->stream->async_handshake(asio::redirect_error(asio::use_awaitable, ec));
        finished = true;
      },
      asio::detached);
  // Run what is ready (the ClientHello goes out) until only the wait for an answer is left.
  while (io->poll() > 0) {
  }
  std::weak_ptr<Owner> watch = owner;
  owner.reset();
  ASSERT_FALSE(watch.expired()) << "the waiting coroutine should hold its stream's owner";
  EXPECT_FALSE(finished);

  io.reset();  // pending operations are destroyed, never run
  EXPECT_TRUE(watch.expired()) << "the coroutine, its stream and their owner were leaked";
  EXPECT_FALSE(finished);
}

}  // namespace
}  // namespace weft
