// TunnelStream joins one plain TCP socket to one HTTP/2 CONNECT stream. Both HBONE roles use it:
// outbound, the socket is the local app's connection; inbound, it is our connection to the
// local target. For the proxy's own HTTP code the other end is a TunnelPipe instead of a
// socket (no kernel hop between the L7 code and the tunnel). It lives on its worker's thread.
//
// Bytes flow with backpressure both ways:
//  - TCP -> h2: a pooled buffer is filled only when the previous one was taken by nghttp2, which
//    takes it only while the peer's flow-control window is open.
//  - h2 -> TCP: received DATA is queued and written; only once written is it "consumed", which
//    reopens the peer's window. Memory per stream is bounded by the stream window.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

#include "core/buffer_pool.h"
#include "stats/metrics.h"
#include "transport/hbone/tunnel_pipe.h"

namespace weft {

class H2Connection;

class TunnelStream : public std::enable_shared_from_this<TunnelStream>, private TunnelPipeSink {
 public:
  // Called once, when both directions are done or the stream failed. `result` is "ok" or why.
  using Finished = std::function<void(const TunnelStream&, const std::string& result)>;

  // `tcp_is_downstream`: true when the TCP side opened the connection (outbound), so bytes read
  // from it count as received; false inbound, where they are the response and count as sent.
  TunnelStream(boost::asio::ip::tcp::socket socket, std::shared_ptr<TcpCounters> counters,
               bool tcp_is_downstream, Metrics& metrics, Finished finished);
  // The other end is `pipe`, read and written by the proxy's HTTP code.
  TunnelStream(std::shared_ptr<TunnelPipe> pipe, std::shared_ptr<TcpCounters> counters,
               bool tcp_is_downstream, Metrics& metrics, Finished finished);
  ~TunnelStream() override;

  boost::asio::ip::tcp::socket& socket() { return socket_; }

  // --- called by H2Connection, inside or outside nghttp2 callbacks ---
  void attach(std::shared_ptr<H2Connection> conn, int32_t stream_id);
  void on_response(int status);  // client role: the CONNECT was answered
  void on_h2_data(const uint8_t* data, size_t len);
  void on_h2_end_stream();
  void on_h2_closed(uint32_t error_code);
  // nghttp2 data source: copies what the TCP side has read.
  long read_for_h2(uint8_t* buf, size_t len, uint32_t* flags);

  // --- called by the proxy layer ---
  // Bytes to send through the tunnel before anything read from the socket (a request head the
  // explicit proxy rewrote); at most BufferPool::kBufferSize. Call before start_relay.
  void set_prefix(std::string bytes) { prefix_ = std::move(bytes); }
  // Called once: with "" when the tunnel is established (before bytes flow), or with the
  // reason it could not be. L7 waits for it to tell a connect failure from a reset.
  void set_on_open(std::function<void(const std::string& failure)> f) { on_open_ = std::move(f); }
  // Starts moving bytes once the tunnel is established (after 200).
  void start_relay();
  // Ends the stream early with a reason for the access log; resets the h2 stream unless the
  // caller already answered it.
  void fail(const std::string& result, bool reset_peer = true);
  std::shared_ptr<H2Connection> connection() const { return conn_; }

  // The SPIFFE ID of the proxy at the other end of the tunnel, once attached.
  const std::string& peer_identity() const { return peer_identity_; }
  bool accepting_data() const { return !done_; }
  uint64_t bytes_from_tcp() const { return from_tcp_; }
  uint64_t bytes_to_tcp() const { return to_tcp_; }
  int32_t stream_id() const { return stream_id_; }

 private:
  void arm_tcp_read();
  void on_tcp_readable(const boost::system::error_code& ec);
  void write_to_tcp();
  void finish(const std::string& result);
  void maybe_finish();
  void count_from_tcp(size_t n);
  void count_to_tcp(size_t n);
  // TunnelPipeSink
  void pipe_has_output() override;
  void pipe_consumed(size_t n) override;
  void pipe_closed(bool unread) override;

  boost::asio::ip::tcp::socket socket_;
  std::shared_ptr<TunnelPipe> pipe_;  // set: the other end is in process, socket_ is unused
  std::shared_ptr<TcpCounters> counters_;
  bool tcp_is_downstream_;
  Metrics& metrics_;
  Finished finished_;
  std::function<void(const std::string&)> on_open_;

  std::shared_ptr<H2Connection> conn_;
  int32_t stream_id_ = -1;
  std::string peer_identity_;

  // TCP -> h2
  BufferPool::Buffer rbuf_;
  size_t rlen_ = 0, roff_ = 0;
  std::string prefix_;
  bool reading_ = false;
  bool tcp_eof_ = false;
  bool relaying_ = false;

  // h2 -> TCP
  std::vector<uint8_t> pending_;
  std::vector<uint8_t> inflight_;
  bool writing_ = false;
  bool h2_eof_ = false;
  bool tcp_write_shut_ = false;

  bool h2_closed_ = false;
  bool done_ = false;
  std::string result_ = "ok";
  uint64_t from_tcp_ = 0, to_tcp_ = 0;
};

}  // namespace weft
