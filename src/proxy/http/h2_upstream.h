// A client HTTP/2 connection (prior knowledge) to one upstream endpoint: a peer proxy through
// an HBONE stream, or an app that speaks HTTP/2 (gRPC). Many downstream streams share it, each
// as one request stream; the pool hands it out while it has room for more.
//
// Flow control is end to end: response DATA is credited back (WINDOW_UPDATE) only when the
// downstream side has passed it on (consume()), and request DATA is pulled from the sink only
// as the upstream's window allows.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "proxy/http/upstream_pool.h"

struct nghttp2_session;

namespace weft {

using H2Fields = std::vector<std::pair<std::string, std::string>>;  // lower-case names

class H2Upstream : public std::enable_shared_from_this<H2Upstream> {
 public:
  // The owner of one request stream (a downstream stream being forwarded).
  class Sink {
   public:
    virtual ~Sink() = default;
    // The final response header (:status first); `end_stream` when no body follows.
    virtual void on_response_head(H2Fields fields, bool end_stream) = 0;
    virtual void on_response_data(const uint8_t* data, size_t len) = 0;  // credit: consume()
    virtual void on_response_trailers(H2Fields fields) = 0;
    // The stream is over: error 0 after a whole response, else the reset's error code (or
    // NGHTTP2_CONNECT_ERROR-like codes when the connection broke).
    virtual void on_stream_end(uint32_t error_code) = 0;
    // Up to `len` request body bytes into `buf`; *eof once the body is complete. 0 bytes
    // without eof: nothing yet (call resume() when there is).
    virtual size_t pull_request_body(uint8_t* buf, size_t len, bool* eof) = 0;
    // Sent after the body when not empty (read once the body is complete).
    virtual const H2Fields* request_trailers() const { return nullptr; }
  };

  static constexpr uint32_t kMaxStreams = 100;  // we open on one connection at most

  H2Upstream(boost::asio::io_context& io, std::shared_ptr<UpstreamConn> conn);
  ~H2Upstream();
  H2Upstream(const H2Upstream&) = delete;
  H2Upstream& operator=(const H2Upstream&) = delete;

  void start();
  // Opens a stream carrying `head` (pseudo-headers first); the body, if `has_body`, is pulled
  // from the sink. Returns the stream ID, or -1 when this connection takes no more streams.
  int32_t submit(const H2Fields& head, bool has_body, std::weak_ptr<Sink> sink);
  void resume(int32_t stream_id);  // more request body is ready
  void consume(int32_t stream_id, size_t n);
  void reset(int32_t stream_id);
  // No new streams; closes (GOAWAY) once the open ones are done. The proxy drains.
  void retire();
  // Open, not told to go away, and below the peer's concurrent stream limit.
  bool has_room() const;
  bool closed() const { return closed_; }
  size_t active_streams() const { return sinks_.size(); }
  const UpstreamConn& conn() const { return *conn_; }

  // --- nghttp2 callback targets (public for the C trampolines only) ---
  int on_header(int32_t stream_id, uint8_t cat, std::string_view name, std::string_view value);
  int on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags, uint8_t cat);
  int on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len);
  int on_stream_close(int32_t stream_id, uint32_t error_code);
  long pull(int32_t stream_id, uint8_t* buf, size_t len, uint32_t* flags);
  void on_goaway() { going_away_ = true; }

 private:
  struct Pending {
    std::weak_ptr<Sink> sink;
    H2Fields head;  // the response header or trailers being received
    bool got_head = false;
  };
  void do_read();
  void flush();
  void schedule_flush();
  void fail_all(uint32_t error_code);
  void arm_idle();

  boost::asio::io_context& io_;
  std::shared_ptr<UpstreamConn> conn_;
  nghttp2_session* session_ = nullptr;
  std::map<int32_t, Pending> sinks_;
  std::unique_ptr<uint8_t[]> in_;
  std::string out_;
  boost::asio::steady_timer idle_;
  bool writing_ = false;
  bool in_nghttp2_ = false;
  bool flush_posted_ = false;
  bool closed_ = false;
  bool going_away_ = false;
};

}  // namespace weft
