// One downstream HTTP/2 connection (prior-knowledge h2c, as gRPC clients and h2load speak it)
// on an L7 listener. nghttp2 decodes the frames; each stream becomes one HTTP/1.1 exchange
// handed over an in-process pipe pair to an HttpSession, so every L7 feature (routing, balancing,
// retries, breakers, rate limits, HMAC, authorization, metrics, access log) applies per stream
// exactly as it does for HTTP/1.1. The response streams back as HEADERS and DATA frames.
//
// Backpressure both ways: request DATA is acknowledged (WINDOW_UPDATE) only once written to the
// session, and the response is read from the session only while less than kMaxBuffered waits for
// the client's window.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include "proxy/http/h2_upstream.h"
#include "proxy/http/http_session.h"

struct nghttp2_session;

namespace weft {

class H2Downstream : public std::enable_shared_from_this<H2Downstream>, public DrainableHttp {
 public:
  // The snapshot keeps everything `view` points to alive.
  H2Downstream(HttpWorkerEnv& env, SnapshotPtr snapshot, HttpListenerView view,
               ByteStream downstream);
  ~H2Downstream() override;
  H2Downstream(const H2Downstream&) = delete;
  H2Downstream& operator=(const H2Downstream&) = delete;

  void start();
  // GOAWAY: the streams taken so far are served, then the connection closes.
  void drain() override;

  // --- nghttp2 callback targets (public for the C trampolines only) ---
  struct Stream;
  int on_begin_headers(int32_t stream_id, int category);
  int on_header(int32_t stream_id, std::string_view name, std::string_view value);
  int on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags, int category);
  int on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len);
  int on_stream_close(int32_t stream_id);
  long provide_body(Stream& s, uint8_t* buf, size_t len, uint32_t* flags);

 private:
  friend class H2Forward;  // a stream forwarded as HTTP/2 answers through the connection
  void do_read();
  void flush();
  void terminate();
  void linger_close();
  void arm_idle_timer();
  void go_away_if_draining();
  void start_exchange(const std::shared_ptr<Stream>& s, bool end_stream);
  void pump_request(const std::shared_ptr<Stream>& s);
  void read_response_head(const std::shared_ptr<Stream>& s);
  void read_response_body(const std::shared_ptr<Stream>& s);
  void submit_head(const std::shared_ptr<Stream>& s);
  void local_answer(const std::shared_ptr<Stream>& s, int status, const std::string& body);
  void reset(const std::shared_ptr<Stream>& s);
  // For forwarded streams: the response header (its body then comes from s.body, its
  // trailers from s.trailers), more of the body, or a reset with the upstream's error code.
  void respond(const std::shared_ptr<Stream>& s, const H2Fields& head, bool end_stream);
  void resume_response(Stream& s);
  void reset_stream(Stream& s, uint32_t error_code);
  // A stream's session, once both its request and response are through and it stays alive,
  // serves a later stream: no socket pair and no session set up per request.
  void recycle_bridge(const std::shared_ptr<Stream>& s);
  std::unique_ptr<ByteStream> take_bridge();

  HttpWorkerEnv& env_;
  SnapshotPtr snap_;
  const HttpListenerView view_;
  std::string client_ip_;  // the app's address: rate limits and ring hashes are per source
  ByteStream down_;
  boost::asio::steady_timer idle_timer_;
  nghttp2_session* session_ = nullptr;
  std::map<int32_t, std::shared_ptr<Stream>> streams_;
  std::vector<std::unique_ptr<ByteStream>> idle_bridges_;
  std::unique_ptr<uint8_t[]> in_;
  std::string out_;
  bool writing_ = false;
  bool in_nghttp2_ = false;
  bool closed_ = false;
  bool active_since_timer_ = false;
  bool going_away_ = false;
  bool lingering_ = false;
};

// Whether the first bytes a client sent are (a prefix of) the HTTP/2 connection preface.
enum class PrefaceMatch { no, partial, yes };
PrefaceMatch match_h2_preface(std::string_view bytes);

}  // namespace weft
