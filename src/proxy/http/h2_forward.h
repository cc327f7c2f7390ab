// One downstream HTTP/2 stream forwarded as an HTTP/2 stream to a service whose endpoints
// speak HTTP/2 (`http: {protocol: http2}`, gRPC): headers, DATA in both directions as it comes
// (full-duplex streaming), trailers and resets pass through; no HTTP/1.1 re-encoding and no
// HttpSession. The same L7 policy applies as on the HTTP/1.1 path (request_policy.h): routing,
// splits, balancing, rate limits, fault injection, the max_requests / connection breakers,
// outlier detection, traceparent, header rewrites, Istio metrics and the access log. Inbound:
// the caller's rate limit and authorization.
//
// Different from the HTTP/1.1 path, because a body is streamed and never buffered whole:
// retries happen only while nothing of the request has left (connect failure, a stream the
// upstream refused); the route timeout bounds the wait for the response header, after which a
// stream may run as long as it lives; an HMAC signature carries the body's digest in a trailer
// (hmac_signing.h), and the verifier holds the end of the stream until that trailer matches.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/steady_timer.hpp>

#include "proxy/http/h2_downstream.h"
#include "proxy/http/h2_upstream.h"
#include "proxy/http/hmac_signing.h"
#include "stats/access_log.h"

namespace weft {

struct RouteConfig;
struct LocalReply;
class Cluster;

class H2Forward : public H2Upstream::Sink, public std::enable_shared_from_this<H2Forward> {
 public:
  using Stream = H2Downstream::Stream;

  // Takes the stream when its route's backends all speak HTTP/2 and answers or forwards it;
  // false leaves it to the HTTP/1.1 bridge.
  static bool take(H2Downstream& down, const std::shared_ptr<Stream>& s, bool end_stream);

  H2Forward(H2Downstream& down, const std::shared_ptr<Stream>& s);
  ~H2Forward() override;

  void request_data(const uint8_t* data, size_t len);
  void request_end();
  void request_trailers(H2Fields fields) { req_trailers_ = std::move(fields); }
  // The downstream sent `n` response body bytes: the upstream may send as many more.
  void response_sent(size_t n);
  // The downstream stream closed (answered, reset or the connection is gone): the upstream
  // stream is cancelled if still open, and the request is counted.
  void downstream_closed();

  // H2Upstream::Sink
  void on_response_head(H2Fields fields, bool end_stream) override;
  void on_response_data(const uint8_t* data, size_t len) override;
  void on_response_trailers(H2Fields fields) override;
  void on_stream_end(uint32_t error_code) override;
  size_t pull_request_body(uint8_t* buf, size_t len, bool* eof) override;
  const H2Fields* request_trailers() const override { return &req_trailers_; }

 private:
  void start(const RouteConfig& route, bool end_stream);
  void attempt();
  void on_connected(std::shared_ptr<UpstreamConn> conn, const std::string& failure);
  void open_connection();
  void send(const std::shared_ptr<H2Upstream>& up);
  void attempt_failed(const std::string& why, bool retryable);
  bool retry_on_grpc_status(const H2Fields& fields);
  void sign(bool has_body);               // outbound, each try afresh
  bool admit_signature(bool end_stream);  // inbound; false: answered 401
  void refuse_body(const std::string& why);
  void advance_body(size_t n);
  size_t take_body(uint8_t* buf, size_t len, bool* eof);  // as the client sent it
  size_t take_signed_body(uint8_t* buf, size_t len, bool* eof, std::string_view& payload);
  void schedule_retry();
  void answer(const LocalReply& r);
  void end_endpoint_count();
  std::shared_ptr<Stream> stream() const { return stream_.lock(); }

  std::weak_ptr<H2Downstream> down_;
  H2Downstream& d_;  // valid while down_ is (checked before each use)
  std::weak_ptr<Stream> stream_;
  int32_t id_;
  const RouteConfig* route_ = nullptr;
  const Cluster* cluster_ = nullptr;
  H2Fields upstream_head_;
  std::shared_ptr<H2Upstream> up_;
  int32_t up_id_ = -1;
  int endpoint_ = -1, last_endpoint_ = -1;
  uint64_t tried_ = 0;  // endpoints (index < 64) this request went to
  bool endpoint_counted_ = false;
  bool request_slot_ = false;
  unsigned attempts_ = 0;
  bool in_retry_ = false;
  unsigned refusals_ = 0;
  bool grpc_ = false;  // content-type application/grpc*: local answers carry a grpc-status
  bool deadline_from_client_ = false;  // the header wait is the client's grpc-timeout
  std::string source_, hash_key_;
  std::string req_body_;  // DATA not yet sent upstream (bounded by the stream window)
  size_t req_off_ = 0;
  bool request_done_ = false;
  H2Fields req_trailers_;  // kept for a retry, as the body is
  // HMAC (hmac_signing.h). Outbound: the key, this try's header and the chunks its body goes
  // in (framed_: the frame being sent). Inbound: the key and the verifier of the body's chunks.
  std::string hmac_key_, signature_;
  std::vector<std::string> signed_headers_;
  bool signing_ = false;    // outbound: the body goes in signed chunks
  bool verifying_ = false;  // inbound: the body comes in signed chunks
  ChunkSigner signer_;
  ChunkVerifier verifier_;
  std::string framed_;
  size_t framed_off_ = 0;
  bool last_framed_ = false;
  bool pulled_any_ = false;
  // For retries on a gRPC status: what was sent, while the request fits in kMaxReplay.
  std::string replay_;
  bool replayable_ = false;
  size_t already_credited_ = 0;     // replayed bytes the client's window got back before
  bool ignore_stream_end_ = false;  // the retried try's stream ends after its answer
  bool head_received_ = false;
  bool upstream_done_ = false;       // the upstream stream ended (the rest of the request is moot)
  bool answered_ = false;            // a local answer went out instead
  bool finished_ = false;            // the downstream stream is closed and the request counted
  boost::asio::steady_timer timer_;  // the route timeout, up to the response header
  boost::asio::steady_timer delay_;  // fault delay and retry backoff
  AccessLogEntry entry_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace weft
