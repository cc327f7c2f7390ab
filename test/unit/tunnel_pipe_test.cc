// TunnelPipe: the in-process end of an HBONE stream must behave as a stream socket does, or the
// HTTP code above it (Beast, the HTTP/2 codecs) would see a different world than over TCP.
#include <gtest/gtest.h>

#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "transport/hbone/byte_stream.h"

namespace weft {
namespace {

namespace asio = boost::asio;
namespace http = boost::beast::http;

// Stands in for the TunnelStream: records what the pipe tells it.
struct RecordingSink : TunnelPipeSink {
  int outputs = 0;
  size_t consumed = 0;
  int closed = 0;
  bool closed_unread = false;
  void pipe_has_output() override { ++outputs; }
  void pipe_consumed(size_t n) override { consumed += n; }
  void pipe_closed(bool unread) override {
    ++closed;
    closed_unread = unread;
  }
};

std::string drain(TunnelPipe& pipe) {
  std::string out(1 << 20, '\0');
  const size_t n = pipe.pull(reinterpret_cast<uint8_t*>(out.data()), out.size());
  out.resize(n);
  return out;
}

TEST(TunnelPipe, BeastRequestAndResponseCrossIt) {
  asio::io_context io;
  auto pipe = std::make_shared<TunnelPipe>(io.get_executor());
  RecordingSink sink;
  pipe->attach(&sink);
  ByteStream stream(pipe);

  http::request<http::string_body> req{http::verb::post, "/x", 11};
  req.set(http::field::host, "svc");
  req.body() = "hello";
  req.prepare_payload();
  bool wrote = false;
  http::async_write(stream, req, [&](boost::system::error_code ec, size_t) {
    EXPECT_FALSE(ec) << ec.message();
    wrote = true;
  });
  io.run();
  io.restart();
  ASSERT_TRUE(wrote);
  EXPECT_GE(sink.outputs, 1);
  const std::string sent = drain(*pipe);
  EXPECT_NE(sent.find("POST /x HTTP/1.1\r\n"), std::string::npos);
  EXPECT_NE(sent.find("\r\n\r\nhello"), std::string::npos);

  // The answer arrives in two pieces, the second after the read started waiting.
  boost::beast::flat_buffer buf;
  http::response<http::string_body> resp;
  bool read = false;
  http::async_read(stream, buf, resp, [&](boost::system::error_code ec, size_t) {
    EXPECT_FALSE(ec) << ec.message();
    read = true;
  });
  const std::string head = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nwo";
  pipe->push(reinterpret_cast<const uint8_t*>(head.data()), head.size());
  io.poll();
  EXPECT_FALSE(read);
  pipe->push(reinterpret_cast<const uint8_t*>("rd"), 2);
  io.restart();
  io.run();
  ASSERT_TRUE(read);
  EXPECT_EQ(resp.result_int(), 200);
  EXPECT_EQ(resp.body(), "word");
  EXPECT_EQ(sink.consumed, head.size() + 2);  // every byte read is credited back
}

TEST(TunnelPipe, WritesWaitWhileTheBufferIsFull) {
  asio::io_context io;
  auto pipe = std::make_shared<TunnelPipe>(io.get_executor());
  const std::string big(TunnelPipe::kOutCapacity * 3, 'x');
  bool done = false;
  asio::async_write(*pipe, asio::buffer(big), [&](boost::system::error_code ec, size_t n) {
    EXPECT_FALSE(ec);
    EXPECT_EQ(n, big.size());
    done = true;
  });
  io.poll();
  EXPECT_FALSE(done);  // only the first 64 KiB fit
  size_t pulled = 0;
  while (!done) {
    pulled += drain(*pipe).size();
    io.restart();  // a poll() that ran out of work stops the context
    io.poll();
  }
  pulled += drain(*pipe).size();
  EXPECT_EQ(pulled, big.size());
}

TEST(TunnelPipe, EndOfStreamAndResetReachTheReader) {
  asio::io_context io;
  auto pipe = std::make_shared<TunnelPipe>(io.get_executor());
  pipe->push(reinterpret_cast<const uint8_t*>("ab"), 2);
  pipe->push_eof();
  std::string got(8, '\0');
  boost::system::error_code ec;
  size_t n = 0;
  asio::async_read(*pipe, asio::buffer(got), [&](boost::system::error_code e, size_t k) {
    ec = e;
    n = k;
  });
  io.run();
  EXPECT_EQ(n, 2u);
  EXPECT_EQ(ec, asio::error::eof);

  io.restart();
  auto reset = std::make_shared<TunnelPipe>(io.get_executor());
  reset->push(reinterpret_cast<const uint8_t*>("c"), 1);
  reset->tunnel_finished(false);
  asio::async_read(*reset, asio::buffer(got), [&](boost::system::error_code e, size_t k) {
    ec = e;
    n = k;
  });
  io.run();
  EXPECT_EQ(n, 1u);  // what arrived before the reset is still delivered
  EXPECT_EQ(ec, asio::error::connection_reset);

  bool write_failed = false;
  reset->async_write_some(asio::buffer("z", 1), [&](boost::system::error_code e, size_t) {
    write_failed = e == asio::error::broken_pipe;
  });
  io.restart();
  io.run();
  EXPECT_TRUE(write_failed);
}

TEST(TunnelPipe, CloseWithUnreadBytesResetsAndRefusesMore) {
  asio::io_context io;
  auto pipe = std::make_shared<TunnelPipe>(io.get_executor());
  RecordingSink sink;
  pipe->attach(&sink);
  EXPECT_TRUE(pipe->reusable());
  pipe->push(reinterpret_cast<const uint8_t*>("late"), 4);
  EXPECT_FALSE(pipe->reusable());  // an HTTP/1.1 server said something unasked
  pipe->close();
  EXPECT_EQ(sink.closed, 1);
  EXPECT_TRUE(sink.closed_unread);
  EXPECT_FALSE(pipe->push(reinterpret_cast<const uint8_t*>("x"), 1));
  EXPECT_TRUE(pipe->output_ended());
}

TEST(TunnelPipe, CancelAbortsAPendingRead) {
  asio::io_context io;
  auto pipe = std::make_shared<TunnelPipe>(io.get_executor());
  char b[4];
  boost::system::error_code ec;
  pipe->async_read_some(asio::buffer(b), [&](boost::system::error_code e, size_t) { ec = e; });
  io.poll();
  pipe->cancel();
  io.restart();  // poll() ran out of work, which stops the context
  io.run();
  EXPECT_EQ(ec, asio::error::operation_aborted);
}

}  // namespace
}  // namespace weft
