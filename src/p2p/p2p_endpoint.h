// The agent's peer-to-peer endpoint: one UDP socket (51820 by default) that carries STUN, path
// probes and QUIC, and the paths to every peer agent.
//
// QUIC connections never see an address change: each peer's packets go out on the best path
// the endpoint knows — a direct UDP address that answered a signed probe, or else the relay,
// which is there from the first packet (no connection waits for hole punching). Probes to the
// peer's candidates run beside the connection; the first answer moves its packets to the
// direct path, a direct path that stops answering moves them back to the relay, and probing
// starts again. Streams survive every switch, as with iroh's and Tailscale's magicsock.
//
// Only known peers get in: QUIC datagrams are accepted from the relay (which authenticated the
// sender's key) or from addresses a correctly signed probe came from; the QUIC handshake then
// requires a certificate carrying that same key. Everything runs on one io_context thread.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/object.hpp>

#include "core/result.h"
#include "p2p/probe.h"
#include "p2p/relay_frame.h"
#include "p2p/stun_client.h"
#include "transport/quic/quic_connection.h"
#include "transport/quic/quic_tunnel.h"

namespace weft {

class RelayGroup;

struct P2pPeer {
  relay::NodeKey key{};
  std::string name;
  std::string spiffe_id;
  std::vector<boost::asio::ip::udp::endpoint> candidates;
};

struct P2pOptions {
  // [::] is dual stack (IPv4 and IPv6 peers on one port), falling back to IPv4 alone.
  boost::asio::ip::udp::endpoint listen{boost::asio::ip::udp::v6(), 51820};
  std::string private_pem;  // the node key, for probes
  quic::Settings quic;
  std::chrono::milliseconds probe_interval{1000};     // while looking for a direct path
  std::chrono::milliseconds reprobe_interval{30000};  // after the fast round found nothing
  std::chrono::milliseconds fast_probing{10000};      // how long the fast round lasts
  std::chrono::milliseconds direct_ping{2000};        // keeps a direct path (and NAT) alive
  std::chrono::milliseconds direct_timeout{5000};     // no pong for this long: back to relay
  // A direct path falls under suspicion when QUIC's probe timeout fires with data unacknowledged,
  // or the peer's packets arrive over the relay instead; then it is probed every
  // `suspect_probe_interval`, and it is dropped when none of those probes is answered within
  // max(confirm_loss, 4 probe RTTs, 2 QUIC RTTs). Streams move to the relay in well under a
  // second instead of waiting out direct_timeout and QUIC's doubling backoff.
  std::chrono::milliseconds suspect_probe_interval{100};
  std::chrono::milliseconds confirm_loss{300};
  std::chrono::milliseconds learned_peer_linger{120000};   // peers outside the view, once idle
  std::chrono::milliseconds call_me_maybe_interval{5000};  // at most one offer per peer per
  // Never look for a direct path: for networks whose policy forbids peer-to-peer UDP, and to
  // measure the relay (as Tailscale's TS_DEBUG_ALWAYS_USE_DERP).
  bool relay_only = false;
};

class P2pEndpoint {
 public:
  static Result<std::unique_ptr<P2pEndpoint>> start(boost::asio::io_context& io, P2pOptions o);
  ~P2pEndpoint();

  uint16_t port() const;
  const relay::NodeKey& node_key() const { return self_key_; }
  // The node certificate changed (or arrived): new connections use it.
  void set_tls(std::shared_ptr<const quic::QuicTls> tls);
  void set_peers(std::vector<P2pPeer> peers);
  // Where peers may reach us (reflexive and interface addresses), offered to a peer over the
  // relay when we look for a direct path to it (call-me-maybe).
  void set_own_candidates(std::vector<boost::asio::ip::udp::endpoint> candidates);
  void set_relay(RelayGroup* relay) { relay_ = relay; }
  void on_relay_packet(const relay::NodeKey& from, const uint8_t* data, size_t len);
  // What a peer's tunnel request may reach here.
  void set_authorize(quic::QuicTunnel::Authorize authorize) { authorize_ = std::move(authorize); }
  // Told of each peer's tunnel as it ends (the agent's access log and metrics).
  using AcceptedTunnelDone = std::function<void(
      const std::string& peer_identity, const quic::QuicTunnel&, const std::string& result)>;
  void set_accepted_tunnel_done(AcceptedTunnelDone done) { accepted_done_ = std::move(done); }

  // Tunnels `socket` to `authority` at `peer`, over the connection to it (dialed if needed).
  using Finished = std::function<void(const std::string& result, uint64_t sent, uint64_t received)>;
  void connect(const relay::NodeKey& peer, boost::asio::ip::tcp::socket socket,
               const std::string& authority, Finished finished);

  // A STUN probe of this very socket's mapping (so the reflexive port is the QUIC port).
  void stun(const std::vector<boost::asio::ip::udp::endpoint>& servers,
            std::function<void(Result<NatReport>)> done);

  boost::json::object status() const;
  std::string metrics_text() const;

 private:
  struct Waiting {
    boost::asio::ip::tcp::socket socket;
    std::string authority;
    Finished finished;
  };
  struct Outstanding {
    relay::NodeKey peer;
    boost::asio::ip::udp::endpoint to;
    std::chrono::steady_clock::time_point sent;
    bool full_size = false;  // padded to probe::kFullDatagram
  };
  struct PeerState {
    P2pPeer info;
    std::vector<std::shared_ptr<quic::Connection>> conns;
    std::vector<Waiting> waiting;
    std::optional<boost::asio::ip::udp::endpoint> direct;
    // The direct address that answered a ping padded to a full datagram: QUIC sends datagrams
    // of that size on it; until then, QUIC's minimum (a smaller path MTU must not black-hole).
    std::optional<boost::asio::ip::udp::endpoint> full_size_direct;
    std::vector<boost::asio::ip::udp::endpoint> seen_from;  // where its signed pings came from
    std::vector<boost::asio::ip::udp::endpoint> offered;    // its last call-me-maybe
    std::chrono::steady_clock::time_point last_call_out{}, last_call_in{};
    std::chrono::steady_clock::time_point last_pong{}, last_change{}, fast_until{}, last_round{};
    std::string last_change_why;
    std::chrono::steady_clock::time_point last_ping{};      // keepalive probe on the direct path
    std::chrono::steady_clock::time_point suspect_since{};  // zero: the direct path is trusted
    std::chrono::steady_clock::time_point last_suspect_probe{};
    // The direct path we just gave up on: stray QUIC packets from it do not bring it back (only
    // an answered probe does), or a path that is dead one way would flap.
    std::optional<boost::asio::ip::udp::endpoint> dead_direct;
    std::chrono::steady_clock::time_point dead_at{};
    std::chrono::microseconds probe_rtt{0};
    uint64_t path_changes = 0;
    bool dialing = false;
    // Not in our view (it hosts nothing we reach) but it reached us through the relay, which
    // admits only registered nodes; kept while it has a connection.
    bool learned = false;
    std::chrono::steady_clock::time_point last_seen{};  // its last packet or probe
    // Datagrams sent while there was no path at all (no relay yet, no direct answer): the
    // first path to appear carries them, so a handshake does not wait for QUIC's backoff.
    std::deque<std::vector<uint8_t>> unsent;
  };
  struct StunQuery;

  P2pEndpoint(boost::asio::io_context& io, P2pOptions o);
  void arm_read();
  void on_readable();
  void dispatch(const boost::asio::ip::udp::endpoint& from, const uint8_t* data, size_t len);
  void on_quic(const relay::NodeKey& peer, const uint8_t* data, size_t len, bool via_relay);
  void on_probe(const std::optional<boost::asio::ip::udp::endpoint>& from, const uint8_t* data,
                size_t len);
  void send_probe(PeerState& p, const boost::asio::ip::udp::endpoint& to, bool full_size = false);
  // The largest QUIC datagram for the peer's current path.
  size_t max_datagram(const PeerState& p) const;
  // Pings every address the peer may have (published, offered, seen); offers ours over the
  // relay so that its pings and ours cross.
  void probe_round(PeerState& p);
  void send_call_me_maybe(PeerState& p);
  void on_call_me_maybe(const relay::NodeKey& from, const uint8_t* data, size_t len);
  void send_to_peer(const relay::NodeKey& peer, const uint8_t* data, size_t len, size_t segment);
  void send_unsent(PeerState& p);
  void send_udp(const boost::asio::ip::udp::endpoint& to, const uint8_t* data, size_t len,
                size_t segment);
  std::shared_ptr<quic::Connection> usable(PeerState& p) const;
  void dial(PeerState& p);
  quic::Connection::Hooks hooks(const relay::NodeKey& peer);
  void on_established(const relay::NodeKey& peer);
  void on_closed(const relay::NodeKey& peer, quic::Connection& c, const std::string& why);
  void set_path(PeerState& p, std::optional<boost::asio::ip::udp::endpoint> direct,
                const std::string& why);
  void tick();
  // Fast detection of a dead direct path (see P2pOptions::confirm_loss).
  void check_direct(PeerState& p, std::chrono::steady_clock::time_point now);
  void suspect_direct(PeerState& p, const char* why);
  void lose_direct(PeerState& p, std::chrono::steady_clock::time_point now, const std::string& why);
  void stun_send(const std::shared_ptr<StunQuery>& q);
  PeerState* find(const relay::NodeKey& key);
  // A node outside our view that proved its key (relay, signed probe); nullptr when too many.
  PeerState* learn(const relay::NodeKey& key);
  void forget(std::map<relay::NodeKey, PeerState>::iterator it);

  boost::asio::io_context& io_;
  P2pOptions options_;
  boost::asio::ip::udp::socket socket_;
  boost::asio::steady_timer ticker_;
  // Handlers already queued when the endpoint is destroyed still run (a wait that completed
  // cannot be cancelled); they check this first.
  std::shared_ptr<char> alive_ = std::make_shared<char>();
  std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> key_{nullptr, EVP_PKEY_free};
  relay::NodeKey self_key_{};
  std::shared_ptr<const quic::QuicTls> tls_;
  RelayGroup* relay_ = nullptr;
  quic::QuicTunnel::Authorize authorize_;
  AcceptedTunnelDone accepted_done_;
  std::map<relay::NodeKey, PeerState> peers_;
  std::chrono::steady_clock::time_point last_reset_window_{};  // stateless resets: 10 a second
  int resets_in_window_ = 0;
  std::map<std::string, std::pair<relay::NodeKey, std::weak_ptr<quic::Connection>>> cids_;
  std::map<boost::asio::ip::udp::endpoint, relay::NodeKey> addresses_;  // verified sources
  std::map<probe::TxId, Outstanding> outstanding_;
  std::vector<std::shared_ptr<StunQuery>> stun_;
  std::vector<uint8_t> rbuf_;
  std::vector<boost::asio::ip::udp::endpoint> own_candidates_;
  bool gso_ = true;
  bool v6_socket_ = false;  // dual stack: IPv4 destinations go out v4-mapped

  struct Counters {
    uint64_t udp_in = 0, udp_garbage = 0, unknown_source = 0, probes_in = 0, probes_bad = 0,
             probes_unknown_key = 0, relay_in = 0, relay_out = 0, direct_out = 0, send_errors = 0,
             stateless_resets = 0, no_path = 0, tunnels_opened = 0, tunnels_accepted = 0,
             direct_suspected = 0, direct_lost = 0, calls_out = 0, calls_in = 0;
  } counters_;
};

}  // namespace weft
