// QuicTunnel joins one TCP connection to one QUIC stream, with HBONE's CONNECT semantics in a
// small framing (docs/p2p-protocol.md):
//   request  (opener → peer): u16 length, then the target authority (1–255 bytes);
//   response (peer → opener): u16 status (200, 400, 401, 503), u8 length, a reason;
// then raw bytes both ways, FIN for a half close, a stream reset for an abort. The opener may
// send its first bytes right behind the request (no round trip before the first byte); a peer
// that refuses discards them.
//
// Backpressure both ways: TCP is read only while the stream has room (acknowledged data frees
// it), and received stream data is consumed — reopening the peer's window — only once written
// to TCP. Lives on its connection's io thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

#include "core/host_port.h"
#include "transport/quic/quic_connection.h"

namespace weft::quic {

struct TunnelVerdict {
  int status = 200;  // 200 to connect `target`; else 400, 401 or 503 with `reason`
  std::string reason;
  HostPort target;
};

struct TunnelRequest {
  std::string authority;
};

// The framing, shared with the fuzz target.
std::vector<uint8_t> encode_request(const std::string& authority);
std::vector<uint8_t> encode_response(int status, const std::string& reason);
// Parses from the front of `buf`: nullopt while incomplete, an error if malformed; on success
// `used` is the header's size.
Result<std::optional<TunnelRequest>> parse_request(const uint8_t* buf, size_t len, size_t& used);
struct TunnelResponse {
  int status = 0;
  std::string reason;
};
Result<std::optional<TunnelResponse>> parse_response(const uint8_t* buf, size_t len, size_t& used);

class QuicTunnel : public StreamHandler, public std::enable_shared_from_this<QuicTunnel> {
 public:
  // `result` is "ok" or why it ended.
  using Finished = std::function<void(const QuicTunnel&, const std::string& result)>;
  using Authorize =
      std::function<TunnelVerdict(const std::string& peer_identity, const std::string& authority)>;

  // Opener: a stream on `conn` for `socket`, to `authority` at the peer. Fails (nullptr) when
  // the connection has no stream to give now.
  static std::shared_ptr<QuicTunnel> open(std::shared_ptr<Connection> conn,
                                          boost::asio::ip::tcp::socket socket,
                                          const std::string& authority, Finished finished);
  // Peer side: a stream the other end opened. The returned handler is attached to the stream.
  static std::shared_ptr<QuicTunnel> accept(boost::asio::io_context& io,
                                            std::shared_ptr<Connection> conn, int64_t stream,
                                            Authorize authorize, Finished finished);

  ~QuicTunnel() override;
  const std::string& authority() const { return authority_; }
  uint64_t bytes_from_tcp() const { return from_tcp_; }
  // The accepting side's target, once authorized (for its access log).
  const std::string& target() const { return target_; }
  std::chrono::system_clock::time_point started() const { return started_; }
  uint64_t bytes_to_tcp() const { return to_tcp_; }

  // StreamHandler
  void on_data(const uint8_t* data, size_t len) override;
  void on_fin() override;
  void on_writable() override;
  void on_closed(const std::string& why) override;

 private:
  enum class State { awaiting_header, connecting, relaying, done };
  QuicTunnel(std::shared_ptr<Connection> conn, boost::asio::ip::tcp::socket socket, bool opener);
  void on_request(const TunnelRequest& req);
  void connect_target(std::vector<boost::asio::ip::tcp::endpoint> endpoints,
                      const std::string& target);
  void refuse_connect(const std::string& target, const std::string& why);
  void start_relay();
  void pump_tcp_to_stream();
  void arm_tcp_read();
  void write_to_tcp();
  void maybe_finish();
  void finish(const std::string& result, bool reset_stream);

  std::shared_ptr<Connection> conn_;
  boost::asio::ip::tcp::socket socket_;
  bool opener_;
  int64_t stream_ = -1;
  State state_ = State::awaiting_header;
  Authorize authorize_;
  Finished finished_;
  std::shared_ptr<QuicTunnel> self_;  // alive while the stream is
  std::string authority_;
  std::vector<uint8_t> header_;  // bytes of the peer's header seen so far

  // TCP → stream
  std::vector<uint8_t> rbuf_;
  size_t rlen_ = 0, roff_ = 0;
  bool reading_ = false, tcp_eof_ = false, fin_sent_ = false;
  // stream → TCP
  std::vector<uint8_t> pending_, inflight_;
  bool writing_ = false, stream_fin_ = false, tcp_shut_ = false;

  uint64_t from_tcp_ = 0, to_tcp_ = 0;
  std::string target_;
  std::chrono::system_clock::time_point started_ = std::chrono::system_clock::now();
};

}  // namespace weft::quic
