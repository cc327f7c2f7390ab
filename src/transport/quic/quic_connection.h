// One QUIC connection (ngtcp2 0.12, TLS 1.3 by GnuTLS through ngtcp2-crypto-gnutls) between two
// agents. Both ends present their node certificates; the peer's chain is checked against the
// mesh CA, its SPIFFE ID must be of our trust domain, and its public key must be the node key
// the path layer says the packets come from, so a certificate cannot be borrowed by another
// node.
//
// The connection does not own a socket. Datagrams come in through on_datagram() and leave
// through the Send function, which the P2P endpoint points at the current path (direct UDP or
// the relay) — the connection itself never sees a path change, as with iroh's magicsock, so
// streams survive every switch.
//
// Streams are byte pipes with flow control both ways: write() buffers at most `room()` bytes
// (the data stays until the peer acknowledges it, as ngtcp2 requires); received bytes are
// handed to the StreamHandler and the peer's window reopens only when the handler consume()s
// them. Everything runs on one io_context thread.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "core/duration.h"
#include "core/result.h"

struct ngtcp2_conn;
struct ngtcp2_cid;
struct ngtcp2_pkt_stateless_reset;
struct ngtcp2_crypto_conn_ref;
struct gnutls_session_int;
struct gnutls_certificate_credentials_st;

namespace weft::quic {

// The node's TLS identity for QUIC, parsed once and shared by every connection.
class QuicTls {
 public:
  // PEM text: the certificate chain (leaf first), its key, the mesh CA bundle.
  static Result<std::shared_ptr<QuicTls>> create(const std::string& cert_pem,
                                                 const std::string& key_pem,
                                                 const std::string& ca_pem,
                                                 const std::string& trust_domain);
  ~QuicTls();
  gnutls_certificate_credentials_st* credentials() const { return cred_; }
  // Checks a peer chain (DER, leaf first): chains to the CA, valid now, a SPIFFE ID of our trust
  // domain. Returns the SPIFFE ID and the leaf's raw Ed25519 key.
  struct Peer {
    std::string spiffe_id;
    std::array<uint8_t, 32> key{};
  };
  Result<Peer> verify(const std::vector<std::string>& der_chain) const;
  const std::string& trust_domain() const { return trust_domain_; }

 private:
  QuicTls() = default;
  gnutls_certificate_credentials_st* cred_ = nullptr;
  std::string ca_pem_;
  std::string trust_domain_;
};

// Datagram sizes when the owner picks the path (Hooks::max_datagram): QUIC's minimum, which
// every path must carry, and the most a stream transport such as the relay is given. Over TCP
// the size costs nothing, and every datagram costs a packet's work at both ends (AEAD set-up,
// header protection, acknowledgement, a relay frame). Measured through the relay (P2P bench,
// alternating runs): 1,452 bytes 0.70 Gbit/s, 16 KiB 0.85-0.88, 32 KiB 1.11-1.14, 60,000
// 1.00-1.07.
inline constexpr size_t kMinDatagram = 1200;
inline constexpr size_t kMaxDatagram = 32768;

struct Settings {
  Millis keepalive = std::chrono::seconds(15);
  Millis idle_timeout = std::chrono::seconds(60);
  Millis handshake_timeout = std::chrono::seconds(10);
  uint64_t stream_window = 8u << 20;  // per stream, auto-tuned up to this
  uint64_t conn_window = 32u << 20;
  size_t stream_send_buffer = 1u << 20;  // unacknowledged bytes a stream may hold
  uint64_t max_streams = 1000;
  // Stateless reset (RFC 9000 10.3): tokens derived from this secret and each connection ID,
  // so an endpoint that restarted (same secret, no state) can tell a peer its connection is
  // gone instead of leaving it to the idle timeout. Unset: random tokens, no resets.
  std::optional<std::array<uint8_t, 32>> reset_secret;
};

// The stateless reset token for a connection ID under `secret` (HMAC-SHA256, truncated).
std::array<uint8_t, 16> stateless_reset_token(const std::array<uint8_t, 32>& secret,
                                              const uint8_t* cid, size_t cid_len);
// A Stateless Reset answering a packet of `received_len` bytes for `dcid`, shorter than it
// (so two endpoints can never ping-pong resets); empty when the packet was too small to answer.
std::vector<uint8_t> stateless_reset_packet(const std::array<uint8_t, 32>& secret,
                                            const std::string& dcid, size_t received_len);

// What a stream tells its user. Calls come from inside the connection; the handler may write,
// consume or close from them.
class StreamHandler {
 public:
  virtual ~StreamHandler() = default;
  virtual void on_data(const uint8_t* data, size_t len) = 0;  // consume() once written out
  virtual void on_fin() = 0;
  virtual void on_writable() = 0;  // room() grew (the peer acknowledged data)
  // The stream is gone (both directions done, reset, or the connection closed).
  virtual void on_closed(const std::string& why) = 0;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  enum class Role { client, server };
  // A batch of datagrams for the path layer: `count` packets of `segment` bytes each (the last
  // may be shorter), back to back in `data` — one GSO send where the path supports it.
  using Send = std::function<void(const uint8_t* data, size_t len, size_t segment)>;
  struct Hooks {
    std::function<void(Connection&)> on_established;
    std::function<void(Connection&, const std::string& why)> on_closed;
    // The peer opened a stream; return its handler (owned by the caller) or nullptr to reset.
    std::function<StreamHandler*(Connection&, int64_t stream_id)> on_stream;
    // A connection ID this connection answers to, added or retired, for the endpoint's map.
    std::function<void(Connection&, const std::string& cid, bool added)> on_cid;
    // The largest datagram the path in use carries now, in [kMinDatagram, kMaxDatagram]: for
    // an owner that moves datagrams between paths of different sizes behind one QUIC path
    // (P2P: direct UDP or the relay). Unset: ngtcp2's path MTU discovery decides.
    std::function<size_t()> max_datagram;
  };

  // Client: dials; `expected_key` is the node key the peer certificate must carry.
  static Result<std::shared_ptr<Connection>> client(boost::asio::io_context& io,
                                                    std::shared_ptr<const QuicTls> tls,
                                                    const Settings& settings,
                                                    const std::array<uint8_t, 32>& expected_key,
                                                    Send send, Hooks hooks);
  // Server: from a client's first Initial packet (which must then be fed to on_datagram).
  static Result<std::shared_ptr<Connection>> server(boost::asio::io_context& io,
                                                    std::shared_ptr<const QuicTls> tls,
                                                    const Settings& settings,
                                                    const std::array<uint8_t, 32>& expected_key,
                                                    const uint8_t* initial, size_t len, Send send,
                                                    Hooks hooks);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void on_datagram(const uint8_t* data, size_t len);
  // Sends what is due now (after a batch of on_datagram calls, or writes).
  void flush();

  // -1 when the peer allows no more streams now.
  int64_t open_stream(StreamHandler* handler);
  size_t room(int64_t stream) const;
  size_t write(int64_t stream, const uint8_t* data, size_t len);  // takes at most room()
  void shutdown_write(int64_t stream);                            // FIN after what was written
  void consume(int64_t stream, size_t len);                       // reopens the peer's window
  void reset(int64_t stream, uint64_t code);                      // both directions, at once
  // The handler will not be called again (its owner is going away).
  void detach(int64_t stream);

  void close(const std::string& why);
  bool established() const { return established_; }
  bool closed() const { return closed_; }
  Role role() const { return role_; }
  const std::string& peer_identity() const { return peer_identity_; }
  std::chrono::microseconds smoothed_rtt() const;
  // What congestion control believes now, for operators (`/status`), as `ss -ti` shows for TCP.
  struct Congestion {
    uint64_t cwnd = 0;             // bytes
    uint64_t bytes_in_flight = 0;  // sent, not yet acknowledged or declared lost
    uint64_t delivery_rate = 0;    // bytes per second, as last measured
  };
  Congestion congestion() const;
  // QUIC's own sign that the path may have died: how many probe timeouts in a row fired while
  // data waited for acknowledgement (0 on a path that acknowledges).
  size_t unanswered_probe_timeouts() const;
  size_t open_streams() const { return streams_.size(); }
  std::vector<std::string> cids() const;

  // Called from the TLS verify callback.
  int verify_peer(gnutls_session_int* session);

 private:
  struct Stream {
    StreamHandler* handler = nullptr;
    std::deque<std::vector<uint8_t>> sendq;  // not yet acknowledged as a whole, oldest first
    uint64_t base = 0;                       // stream offset of sendq.front()[0]
    uint64_t acked = 0;                      // the peer has everything below this offset
    uint64_t sent = 0;                       // offset up to which ngtcp2 has taken data
    uint64_t written = 0;                    // offset of the end of what the user wrote
    bool fin_wanted = false, fin_sent = false, blocked = false, queued = false;
  };

  Connection(boost::asio::io_context& io, std::shared_ptr<const QuicTls> tls, Role role,
             const Settings& settings, const std::array<uint8_t, 32>& expected_key, Send send,
             Hooks hooks);
  Result<bool> init_tls();
  void arm_timer();
  void on_timer();
  void fail(const std::string& why, bool send_close);
  void finish_close(const std::string& why);
  void mark_ready(int64_t id);
  void send_batch(const uint8_t* data, size_t len, size_t segment);
  void schedule_flush();

  // ngtcp2 callbacks
  static int on_handshake_completed(ngtcp2_conn*, void* self);
  static int on_recv_stream_data(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t offset,
                                 const uint8_t* data, size_t len, void* self, void* stream);
  static int on_acked(ngtcp2_conn*, int64_t id, uint64_t offset, uint64_t len, void* self,
                      void* stream);
  static int on_stream_open(ngtcp2_conn*, int64_t id, void* self);
  static int on_stream_close(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t code, void* self,
                             void* stream);
  static int on_stream_reset(ngtcp2_conn*, int64_t id, uint64_t size, uint64_t code, void* self,
                             void* stream);
  static int on_extend_max_stream_data(ngtcp2_conn*, int64_t id, uint64_t max, void* self,
                                       void* stream);
  static int on_stateless_reset(ngtcp2_conn*, const ngtcp2_pkt_stateless_reset*, void* self);
  static int on_new_cid(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token, size_t len, void* self);
  static int on_remove_cid(ngtcp2_conn*, const ngtcp2_cid* cid, void* self);
  static ngtcp2_conn* get_conn(ngtcp2_crypto_conn_ref* ref);

  boost::asio::io_context& io_;
  std::shared_ptr<const QuicTls> tls_;
  Role role_;
  Settings settings_;
  std::array<uint8_t, 32> expected_key_;
  Send send_;
  Hooks hooks_;
  ngtcp2_conn* conn_ = nullptr;
  gnutls_session_int* session_ = nullptr;
  std::unique_ptr<ngtcp2_crypto_conn_ref> conn_ref_;
  boost::asio::steady_timer timer_;
  bool timer_armed_ = false;  // a wait is pending for armed_expiry_
  uint64_t armed_expiry_ = 0, timer_generation_ = 0;
  std::map<int64_t, Stream> streams_;
  std::deque<int64_t> ready_;  // streams with data (or a FIN) to send
  std::vector<uint8_t> batch_;
  std::string peer_identity_;
  std::string close_reason_;
  bool established_ = false;
  bool closed_ = false;
  bool flush_scheduled_ = false;
  bool expiry_posted_ = false;  // on_timer is queued for an expiry that was already due
  bool in_flush_ = false;
};

// The destination connection ID of a datagram and its header form; a cheap look, no decryption.
struct PacketHeader {
  std::string dcid;
  bool long_header = false;
};
std::optional<PacketHeader> peek_header(const uint8_t* data, size_t len);
inline constexpr size_t kCidLength = 16;

}  // namespace weft::quic
