// One downstream HTTP/1.1 connection on an L7 listener: requests are read one at a time,
// routed, balanced over the chosen service's endpoints and sent through pooled upstream
// connections; responses stream back (the body is never buffered whole). Around each request:
// rate limit, fault injection, circuit breakers, retries with backoff and a budget, outlier
// detection, the route timeout, Istio request metrics, an access log line and traceparent.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/serializer.hpp>
#include <boost/beast/http/string_body.hpp>

#include "proxy/http/cluster.h"
#include "proxy/http/h2_upstream.h"
#include "proxy/http/upstream_pool.h"
#include "proxy/snapshot.h"
#include "stats/access_log.h"
#include "stats/metrics.h"

namespace weft {

struct LocalReply;

// A downstream HTTP connection that the worker tells when the proxy drains.
class DrainableHttp {
 public:
  virtual ~DrainableHttp() = default;
  virtual void drain() = 0;
};

// What a worker lends its HTTP sessions.
struct HttpWorkerEnv {
  boost::asio::io_context& io;
  UpstreamPool& pool;
  Metrics& metrics;
  AccessLog& access_log;
  std::map<HttpLabels, std::shared_ptr<HttpCounters>, std::less<>> metric_cache;  // no lock
  std::mt19937_64 rng{std::random_device{}()};
  std::vector<std::weak_ptr<DrainableHttp>> live;  // told to drain; expired ones pruned
  size_t prune_at = 64;
  // Set when the proxy drains: HTTP/1.1 answers say `Connection: close`, HTTP/2 sends GOAWAY,
  // idle connections close after a grace, so clients move on without losing a request.
  bool draining = false;
  // The worker's newest snapshot. Sessions keep the one they started with, but HMAC keys come
  // from this one, so a rotation of control's secret reaches long-lived connections too.
  SnapshotPtr current;

  void track(std::weak_ptr<DrainableHttp> c) {
    live.push_back(std::move(c));
    if (live.size() < prune_at) return;
    std::erase_if(live, [](const auto& w) { return w.expired(); });
    prune_at = std::max<size_t>(64, 2 * live.size());
  }
};

// How long an idle keep-alive connection may still send a request once the proxy drains.
inline constexpr auto kDrainIdleGrace = std::chrono::seconds(1);

// Where a session's requests come from. Outbound: an app on an http listener. Inbound: a peer
// proxy's HBONE stream to a `protocol: http` target, whose identity mTLS proved.
struct HttpListenerView {
  std::string name;
  const std::vector<RouteConfig>* routes = nullptr;
  size_t max_request_body = 0;
  const InboundTargetConfig* inbound = nullptr;  // inbound only
  const InboundHttp* inbound_state = nullptr;
  std::string peer_identity;
  std::string downstream;             // the client's address when the stream is a pipe or pair
  std::string protocol = "http/1.1";  // what the client speaks (http/2: through H2Downstream)

  static HttpListenerView outbound(const OutboundListenerConfig& l) {
    return {l.name, &l.routes, l.max_request_body, nullptr, nullptr, {}, {}, "http/1.1"};
  }
};

class HttpSession : public std::enable_shared_from_this<HttpSession>, public DrainableHttp {
 public:
  // The snapshot keeps everything `view` points to alive.
  HttpSession(HttpWorkerEnv& env, SnapshotPtr snapshot, HttpListenerView view,
              ByteStream downstream);
  ~HttpSession() override;
  HttpSession(const HttpSession&) = delete;
  HttpSession& operator=(const HttpSession&) = delete;
  void start();
  void drain() override;

 private:
  using Request = boost::beast::http::request<boost::beast::http::string_body>;
  using ResponseParser = boost::beast::http::response_parser<boost::beast::http::buffer_body>;
  // grpc_status: a trailers-only answer whose grpc-status the route retries (`on_grpc`).
  enum class Failure { connect, reset, status_5xx, try_timeout, grpc_status };

  void read_request();
  void on_header(const boost::system::error_code& ec, size_t n);
  void on_body(const boost::system::error_code& ec, size_t n);
  void on_parse_error(const boost::system::error_code& ec);
  void handle_request();
  void attempt();
  void open_upstream();
  void on_connected(std::shared_ptr<UpstreamConn> conn, const std::string& failure);
  // A service that speaks only HTTP/2 (http.protocol: http2): the request goes as one stream
  // on a shared connection and the answer comes back as HTTP/1.1 (chunked, trailers in the
  // last chunk). http_session_h2.cc.
  class H2Reply;
  void open_h2();
  void send_h2(std::shared_ptr<H2Upstream> up, bool fresh);
  void on_h2_head(H2Fields fields, bool end_stream);
  void on_h2_data(const uint8_t* data, size_t len);
  void on_h2_end(uint32_t error_code);
  void write_h2();
  void drop_h2();  // cancels the stream if it is still open
  void rewrite_response(boost::beast::http::fields& f) const;
  void send_request();
  void on_response_header(const boost::system::error_code& ec);
  void attempt_failed(Failure kind, const std::string& why, bool retry);
  bool may_retry(Failure kind) const;
  void relay_body();
  void start_tunnel();
  void on_timeout();
  void on_try_timeout();
  void local_reply(unsigned status, const std::string& body, const std::string& flags,
                   const std::string& extra_header_value = {}, bool close_after = false);
  void local_reply(const LocalReply& r);
  // Inbound checks (HMAC, authorization, per-identity rate limit); false when it answered.
  bool admit_inbound(std::string_view path);
  // `h2_stream`: the request goes as an HTTP/2 stream, its body signed in a trailer.
  void sign_request(bool h2_stream = false);
  void finish_request(unsigned status, const std::string& flags, const std::string& result);
  void end_attempt();
  void close();
  // Closes the upstream connection of an attempt that may have I/O pending (cancelling it).
  void abandon_upstream();
  void linger_close();
  void drain_downstream();

  HttpWorkerEnv& env_;
  SnapshotPtr snap_;
  const HttpListenerView listener_;
  ByteStream down_;
  boost::beast::flat_buffer down_buf_;
  std::string source_ip_;
  bool counted_ = false;  // an app's own connection (not a tunnel or bridge): drain waits for it
  bool idle_ = false;     // waiting for the next request's first bytes

  // The request in flight.
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  Request req_;
  size_t req_bytes_ = 0;
  uint64_t generation_ = 0;  // bumps per request; late callbacks of an old one are ignored
  const RouteConfig* route_ = nullptr;
  const Cluster* cluster_ = nullptr;
  bool counted_request_ = false;
  bool in_retry_ = false;
  unsigned attempts_ = 0;
  uint64_t try_seq_ = 0;  // bumps per try and when one is abandoned: late callbacks see it
  int endpoint_ = -1, last_endpoint_ = -1;
  uint64_t tried_ = 0;  // endpoints (index < 64) this request went to
  bool endpoint_counted_ = false;
  std::shared_ptr<UpstreamConn> up_;
  // Per attempt, and held by its pending reads too: an abandoned attempt's read can never
  // land in the next attempt's parser.
  std::shared_ptr<ResponseParser> resp_;
  std::optional<boost::beast::http::response_serializer<boost::beast::http::buffer_body>> ser_;
  char body_chunk_[16 * 1024];
  bool response_started_ = false;
  bool down_keep_alive_ = true;
  bool timed_out_ = false;
  size_t resp_bytes_ = 0;
  std::chrono::steady_clock::time_point started_;
  boost::asio::steady_timer timer_;      // route timeout, or the downstream idle timeout
  boost::asio::steady_timer backoff_;    // retry backoff and fault delay
  boost::asio::steady_timer try_timer_;  // the route's per_try_timeout
  AccessLogEntry entry_;
  std::string hash_key_;
  std::string upgrade_;  // the Upgrade header of the request in flight, if any
  // The HTTP/2 upstream stream of the try in flight, and its answer on the way out.
  std::shared_ptr<H2Upstream> up_h2_;
  std::shared_ptr<H2Reply> h2_reply_;
  int32_t up_h2_id_ = -1;
  size_t h2_body_off_ = 0;           // request body bytes the stream has taken
  std::string h2_out_, h2_writing_;  // response bytes for the client, framed as HTTP/1.1
  size_t h2_credit_ = 0;             // DATA bytes in h2_out_ (credited upstream once written)
  size_t h2_credit_writing_ = 0;     // ... and in h2_writing_
  H2Fields h2_trailers_;
  std::string h2_signed_body_;  // the body in signed chunks, when signed
  bool h2_chunked_ = false, h2_ended_ = false, h2_write_busy_ = false;
  unsigned h2_refusals_ = 0;  // per request
};

// W3C trace context: keeps a valid incoming trace ID, else starts a trace; returns the new
// traceparent value with our own span ID.
std::string next_traceparent(std::string_view incoming, uint64_t r1, uint64_t r2, uint64_t r3,
                             std::string* trace_id);

}  // namespace weft
