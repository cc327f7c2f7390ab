// The P2P endpoint in-process: two agents' endpoints on loopback with real node certificates
// from a mesh CA, real UDP, real QUIC (ngtcp2 + GnuTLS) and a real TCP echo target. The
// relay path runs with control in control_plane_test; here the direct path, restarts, bad
// probes and garbage.
#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/json/serialize.hpp>
#include <future>
#include <thread>

#include <openssl/pem.h>
#include <spdlog/spdlog.h>
#include "identity/certificate_authority.h"
#include "identity/openssl_ptr.h"
#include "p2p/p2p_endpoint.h"
#include "p2p/probe.h"
#include "support/harness.h"

namespace weft::test {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using udp = asio::ip::udp;

struct Node {
  std::string cert, key, ca;
};

class P2pTest : public ::testing::Test {
 protected:
  // Runs f on the io thread and waits for it.
  template <class F>
  auto on_io(F f) {
    std::packaged_task<decltype(f())()> task(std::move(f));
    auto fut = task.get_future();
    asio::post(io_, [&task] { task(); });
    return fut.get();
  }
  void SetUp() override {
    spdlog::set_level(spdlog::level::info);
    init_ca({"p2p.test", KeyType::ed25519, dir_ / "ca", std::chrono::hours(24)});
    thread_ = std::thread([this] {
      auto guard = asio::make_work_guard(io_);
      io_.run();
    });
  }
  void TearDown() override {
    on_io([this] { endpoints_.clear(); });
    io_.stop();
    thread_.join();
  }
  Node node(const std::string& name, const std::string& td = "p2p.test") {
    IssueOptions o;
    o.ca_dir = dir_ / (td == "p2p.test" ? "ca" : "other-ca");
    o.spiffe_id = "spiffe://" + td + "/ns/" + name + "/sa/" + name;
    o.out_dir = dir_ / name;
    issue_certificate(o);
    return {read_file(dir_ / name / "cert.pem"), read_file(dir_ / name / "key.pem"),
            read_file(dir_ / name / "ca.crt")};
  }
  P2pEndpoint* start(const Node& n, uint16_t target_port, uint16_t udp_port = 0,
                     const char* listen_ip = "127.0.0.1", uint64_t conn_window = 0) {
    return on_io([&]() -> P2pEndpoint* {
      P2pOptions o;
      if (conn_window) o.quic.conn_window = conn_window;
      o.listen = udp::endpoint(asio::ip::make_address(listen_ip), udp_port);
      o.private_pem = n.key;
      auto e = P2pEndpoint::start(io_, o);
      EXPECT_TRUE(e.ok()) << e.error();
      auto tls = quic::QuicTls::create(n.cert, n.key, n.ca, "p2p.test");
      EXPECT_TRUE(tls.ok()) << tls.error();
      (*e)->set_tls(*tls);
      (*e)->set_authorize([target_port](const std::string& peer, const std::string& authority) {
        quic::TunnelVerdict v;
        if (authority != "echo") {
          v.status = 400;
          v.reason = "unknown authority " + authority;
        }
        v.target = HostPort{"127.0.0.1", target_port};
        (void)peer;
        return v;
      });
      endpoints_.push_back(std::move(*e));
      return endpoints_.back().get();
    });
  }
  P2pPeer peer_of(P2pEndpoint* e, const std::string& name, const char* ip = "127.0.0.1") {
    return on_io([&] {
      P2pPeer p;
      p.key = e->node_key();
      p.name = name;
      p.candidates = {udp::endpoint(asio::ip::make_address(ip), e->port())};
      return p;
    });
  }
  // A local TCP listener whose connections `from` tunnels to `authority` at `to`.
  uint16_t gateway(P2pEndpoint* from, const relay::NodeKey& to, const std::string& authority) {
    return on_io([&] {
      auto acc = std::make_shared<tcp::acceptor>(
          io_, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
      auto loop = std::make_shared<std::function<void()>>();
      *loop = [this, acc, from, to, authority, loop_w = std::weak_ptr(loop)] {
        acc->async_accept([this, acc, from, to, authority, loop_w](
                              const boost::system::error_code& ec, tcp::socket s) {
          if (ec) return;
          results_.push_back("pending");
          const size_t i = results_.size() - 1;
          from->connect(to, std::move(s), authority,
                        [this, i](const std::string& r, uint64_t, uint64_t) { results_[i] = r; });
          if (auto l = loop_w.lock()) (*l)();
        });
      };
      (*loop)();
      loops_.push_back(loop);
      return acc->local_endpoint().port();
    });
  }
  std::string direct_address(P2pEndpoint* e, const std::string& name) {
    return on_io([&] {
      const auto status = e->status();
      for (const auto& p : status.at("peers").as_array())
        if (p.at("name").as_string() == name && p.as_object().contains("direct_address"))
          return std::string(p.at("direct_address").as_string());
      return std::string("none");
    });
  }
  std::string status_path(P2pEndpoint* e) {
    return on_io([&] {
      auto s = e->status();
      const auto& peers = s.at("peers").as_array();
      return peers.empty() ? std::string("no peer")
                           : std::string(peers.at(0).at("path").as_string());
    });
  }

  TempDir dir_;
  asio::io_context io_;
  std::thread thread_;
  std::vector<std::unique_ptr<P2pEndpoint>> endpoints_;
  std::vector<std::shared_ptr<std::function<void()>>> loops_;
  std::vector<std::string> results_;
};

// Connects, sends, reads the echo; "" on any failure (with the reason in `why`).
std::string echo_through(uint16_t port, const std::string& data, std::string* why = nullptr) {
  try {
    asio::io_context io;
    tcp::socket s(io);
    s.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
    timeval tv{5, 0};  // a tunnel that never answers fails this attempt, not the whole run
    ::setsockopt(s.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(s.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    asio::write(s, asio::buffer(data));
    std::string got(data.size(), '\0');
    asio::read(s, asio::buffer(got));
    return got;
  } catch (const std::exception& e) {
    if (why) *why = e.what();
    return "";
  }
}

std::string eventually_echo(uint16_t port, const std::string& data) {
  std::string why;
  for (int i = 0; i < 100; ++i) {
    if (echo_through(port, data, &why) == data) return data;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling interval
  }
  return "failed: " + why;
}

TEST_F(P2pTest, TunnelsOverADirectQuicPathAndSurvivesAPeerRestart) {
  EchoServer echo;
  const Node a = node("a"), b = node("b");
  P2pEndpoint* ea = start(a, 0);
  P2pEndpoint* eb = start(b, echo.port());
  const P2pPeer pb = peer_of(eb, "b");
  on_io([&] { ea->set_peers({pb}); });  // b learns a from its signed probes
  const uint16_t gw = gateway(ea, pb.key, "echo");
  EXPECT_EQ(eventually_echo(gw, "hello over quic"), "hello over quic");
  EXPECT_EQ(status_path(ea), "direct");

  // A large transfer: flow control and acknowledgements both ways.
  std::string big(4 << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<char>('a' + (i / 4096) % 26);
  EXPECT_EQ(echo_through(gw, big) == big, true);
  // After 4 MiB, congestion control has a window and a measured delivery rate to show.
  on_io([&] {
    const auto peer = ea->status().at("peers").as_array().at(0).as_object();
    EXPECT_GT(peer.at("cwnd_bytes").as_uint64(), 0u) << boost::json::serialize(peer);
    EXPECT_GT(peer.at("delivery_mbit_s").as_double(), 0.0) << boost::json::serialize(peer);
    EXPECT_TRUE(peer.contains("bytes_in_flight")) << boost::json::serialize(peer);
  });

  // b restarts on another port with the same key: a follows it.
  on_io([&] { endpoints_.erase(endpoints_.begin() + 1); });
  eb = start(b, echo.port());
  const P2pPeer pb2 = peer_of(eb, "b");
  on_io([&] { ea->set_peers({pb2}); });
  EXPECT_EQ(eventually_echo(gw, "after restart"), "after restart")
      << on_io([&] { return ea->metrics_text() + eb->metrics_text(); });
}

bool have_ipv6_loopback() {
  asio::io_context io;
  udp::socket s(io);
  boost::system::error_code ec;
  s.open(udp::v6(), ec);
  if (!ec) s.bind(udp::endpoint(asio::ip::make_address("::1"), 0), ec);
  return !ec;
}

TEST_F(P2pTest, ADualStackSocketReachesPeersOverIpv6AndIpv4) {
  if (!have_ipv6_loopback()) {
    std::fprintf(stderr, "\n*** SKIP: no IPv6 loopback (::1) on this host ***\n\n");
    GTEST_SKIP() << "no IPv6 loopback";
  }
  EchoServer echo;
  const Node a = node("a"), b = node("b"), c = node("c");
  // a listens on [::] (both families); b only on IPv6, c only on IPv4.
  P2pEndpoint* ea = start(a, 0, 0, "::");
  P2pEndpoint* eb = start(b, echo.port(), 0, "::1");
  P2pEndpoint* ec = start(c, echo.port(), 0, "127.0.0.1");
  const P2pPeer pb = peer_of(eb, "b", "::1"), pc = peer_of(ec, "c", "127.0.0.1");
  on_io([&] { ea->set_peers({pb, pc}); });
  const uint16_t to_b = gateway(ea, pb.key, "echo"), to_c = gateway(ea, pc.key, "echo");
  EXPECT_EQ(eventually_echo(to_b, "over ipv6"), "over ipv6");
  EXPECT_EQ(eventually_echo(to_c, "over ipv4"), "over ipv4");
  // Both direct, and the IPv4 peer's address is plain IPv4 (not ::ffff:127.0.0.1), so its
  // probes and its QUIC packets are recognised as the same peer.
  EXPECT_EQ(direct_address(ea, "b"), "[::1]:" + std::to_string(on_io([&] { return eb->port(); })));
  EXPECT_EQ(direct_address(ea, "c"),
            "127.0.0.1:" + std::to_string(on_io([&] { return ec->port(); })));
  const std::string metrics = on_io([&] { return ea->metrics_text(); });
  EXPECT_NE(metrics.find("weft_p2p_unknown_source_total 0"), std::string::npos) << metrics;
}

// What `signer` would send over the relay to offer `offered`.
std::vector<uint8_t> offer(const Node& signer, const relay::NodeKey& key,
                           std::vector<udp::endpoint> offered,
                           probe::Type type = probe::Type::call_me_maybe) {
  ossl::Bio bio(BIO_new_mem_buf(signer.key.data(), static_cast<int>(signer.key.size())));
  ossl::Key pkey(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  probe::Probe call{type, key, probe::new_tx(), std::nullopt, std::move(offered)};
  if (type != probe::Type::call_me_maybe) call.offered.clear();
  auto bytes = probe::encode(call, pkey.get());
  EXPECT_TRUE(bytes.ok()) << bytes.error();
  return *bytes;
}

TEST_F(P2pTest, ACallMeMaybeOverTheRelayMakesThePeerProbeTheOfferedAddresses) {
  const Node a = node("a"), b = node("b"), c = node("c");
  P2pEndpoint* ea = start(a, 0);
  P2pEndpoint* eb = start(b, 0);
  const relay::NodeKey ka = on_io([&] { return ea->node_key(); });
  const uint16_t port_a = on_io([&] { return ea->port(); });
  // Neither has the other in its view: b learns where a is only from a's offer (relayed, so
  // handed to b as if the relay had authenticated a's key). Unusable addresses are skipped.
  const auto call = offer(a, ka,
                          {udp::endpoint(asio::ip::make_address("0.0.0.0"), 9),
                           udp::endpoint(asio::ip::make_address("127.0.0.1"), port_a)});
  on_io([&] { eb->on_relay_packet(ka, call.data(), call.size()); });
  std::string found = "none";
  for (int i = 0; i < 500 && found == "none"; ++i) {
    found = on_io([&] {
      const auto s = eb->status();
      for (const auto& p : s.at("peers").as_array())
        if (p.as_object().contains("direct_address"))
          return std::string(p.at("direct_address").as_string());
      return std::string("none");
    });
    if (found == "none") std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(found, "127.0.0.1:" + std::to_string(port_a));
  std::string m = on_io([&] { return eb->metrics_text(); });
  EXPECT_NE(m.find("weft_p2p_calls_me_maybe_received_total 1"), std::string::npos) << m;

  // An offer the relay delivers for another key than the one that signed it, and a ping over
  // the relay (pings test direct paths only): both refused and counted, neither probed.
  P2pEndpoint* ec = start(c, 0);
  const relay::NodeKey kc = on_io([&] { return ec->node_key(); });
  const auto forged = offer(a, ka, {udp::endpoint(asio::ip::make_address("127.0.0.1"), 9)});
  const auto ping = offer(c, kc, {}, probe::Type::ping);
  on_io([&] {
    ec->on_relay_packet(kc, forged.data(), forged.size());
    ec->on_relay_packet(kc, ping.data(), ping.size());
  });
  m = on_io([&] { return ec->metrics_text(); });
  EXPECT_NE(m.find("weft_p2p_probes_rejected_total 2"), std::string::npos) << m;
  EXPECT_NE(m.find("weft_p2p_calls_me_maybe_received_total 0"), std::string::npos) << m;
}

// A target that takes connections, reads nothing (a small receive buffer) and resets each one
// when told to: the peer's tunnel then holds stream data it can never write.
class ResettingSink {
 public:
  ResettingSink() : acceptor_(io_) {
    const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), 0);
    acceptor_.open(ep.protocol());
    acceptor_.set_option(asio::socket_base::receive_buffer_size(4096));
    acceptor_.bind(ep);
    acceptor_.listen();
  }
  uint16_t port() const { return acceptor_.local_endpoint().port(); }
  // False if no connection came within 10 s (the tunnel's stream never got through).
  bool accept_one() {
    acceptor_.non_blocking(true);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      boost::system::error_code ec;
      socket_ = acceptor_.accept(ec);
      if (!ec) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling interval
    }
    return false;
  }
  void reset() {
    socket_.set_option(asio::socket_base::linger(true, 0));
    socket_.close();
  }

 private:
  asio::io_context io_;
  tcp::acceptor acceptor_;
  tcp::socket socket_{io_};
};

// Pushes into `s` (non-blocking) until the tunnel stops taking bytes: every window on the way is
// full. Returns what it wrote.
size_t push_until_stalled(tcp::socket& s) {
  s.non_blocking(true);
  std::vector<char> chunk(64 * 1024, 'z');
  size_t total = 0;
  auto last_progress = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - last_progress < std::chrono::milliseconds(300)) {
    boost::system::error_code ec;
    const size_t n = s.write_some(asio::buffer(chunk), ec);
    if (n > 0) {
      total += n;
      last_progress = std::chrono::steady_clock::now();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling interval
    }
  }
  return total;
}

// Each stream the peer aborts while holding data it was given must hand that data's credit back
// to the connection's flow control; before, a few such aborts (an iperf3 server closing its data
// socket mid-test) used up the connection's window and every later stream stalled.
TEST_F(P2pTest, StreamsAbortedWithDataInHandDoNotStarveTheConnection) {
  ResettingSink sink;
  EchoServer echo;
  const Node a = node("a"), b = node("b");
  // The receiving side's connection window stays at its initial 4 MiB (no auto-tuning above
  // it), so a few leaked streams would use it all.
  P2pEndpoint* ea = start(a, 0);
  std::atomic<uint16_t> target{sink.port()};  // the sink, then the echo server
  P2pEndpoint* eb = start(b, 0, 0, "127.0.0.1", 4u << 20);
  on_io([&] {
    eb->set_authorize([&target](const std::string&, const std::string&) {
      quic::TunnelVerdict v;
      v.target = HostPort{"127.0.0.1", target.load()};
      return v;
    });
  });
  const P2pPeer pb = peer_of(eb, "b");
  on_io([&] { ea->set_peers({pb}); });
  const uint16_t gw = gateway(ea, pb.key, "sink");
  size_t pushed = 0;
  for (int round = 0; round < 12; ++round) {
    asio::io_context io;
    tcp::socket s(io);
    s.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), gw));
    ASSERT_TRUE(sink.accept_one()) << "round " << round << ": the stream never reached b, after "
                                   << pushed << " bytes pushed into the aborted streams before";
    pushed += push_until_stalled(s);
    sink.reset();
  }
  std::printf("12 streams aborted by their target with %.1f MiB pushed into them\n",
              static_cast<double>(pushed) / (1 << 20));
  EXPECT_GT(pushed, size_t{8} << 20) << "the peer held data in each aborted stream";
  // The same connection still carries a new stream, in full.
  target = echo.port();
  std::string big(2 << 20, 'y');
  EXPECT_EQ(echo_through(gw, big) == big, true)
      << on_io([&] { return ea->metrics_text() + eb->metrics_text(); });
}

TEST_F(P2pTest, RefusesAPeerOfAnotherTrustDomainAndUnknownAuthorities) {
  EchoServer echo;
  init_ca({"elsewhere.test", KeyType::ed25519, dir_ / "other-ca", std::chrono::hours(24)});
  const Node a = node("a"), b = node("b"), x = node("x", "elsewhere.test");
  P2pEndpoint* ea = start(a, 0);
  P2pEndpoint* eb = start(b, echo.port());
  const P2pPeer pb = peer_of(eb, "b");
  on_io([&] { ea->set_peers({pb}); });
  // An unknown authority is answered 400 and the tunnel ends with that reason.
  const uint16_t bad = gateway(ea, pb.key, "nope");
  std::string why;
  EXPECT_EQ(echo_through(bad, "x", &why), "");
  for (int i = 0; i < 300 && on_io([&] { return results_.back(); }) == "pending"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling interval
  EXPECT_NE(on_io([&] { return results_.back(); }).find("400"), std::string::npos);

  // x holds a certificate of another trust domain (and trusts ours): b refuses its handshake,
  // and x's tunnel fails instead of reaching the echo target.
  const Node x_trusting_us{x.cert, x.key, a.ca};
  P2pEndpoint* ex = start(x_trusting_us, 0);
  on_io([&] { ex->set_peers({pb}); });
  const uint16_t from_x = gateway(ex, pb.key, "echo");
  EXPECT_EQ(echo_through(from_x, "x", &why), "");
  for (int i = 0; i < 1500 && on_io([&] { return results_.back(); }) == "pending"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling interval
  // TLS 1.3: the client's handshake ends before the server has checked its certificate, so
  // x sees its connection closed by b rather than a failed handshake.
  const std::string result = on_io([&] { return results_.back(); });
  EXPECT_TRUE(result.find("closed by the peer") != std::string::npos ||
              result.rfind("p2p_connect_failed", 0) == 0)
      << result;
  EXPECT_EQ(echo.accepted(), 0u);
}

TEST_F(P2pTest, GarbageAndForgedProbesAreCountedAndIgnored) {
  const Node a = node("a");
  P2pEndpoint* ea = start(a, 0);
  const uint16_t port = on_io([&] { return ea->port(); });
  asio::io_context io;
  udp::socket s(io, udp::endpoint(udp::v4(), 0));
  const udp::endpoint to(asio::ip::make_address("127.0.0.1"), port);
  // Random bytes and a QUIC-looking packet from a stranger.
  s.send_to(asio::buffer(std::string("\x03garbage")), to);
  s.send_to(asio::buffer(std::string(1200, '\xc3')), to);
  // A probe whose signature does not match the key it names.
  std::vector<uint8_t> forged(probe::kSize, 0);
  const uint8_t magic[8] = {0x10, 'w', 'e', 'f', 't', 'p', 'r', 'b'};
  std::copy(magic, magic + 8, forged.begin());
  forged[8] = 1;
  forged[9] = 0x42;
  s.send_to(asio::buffer(forged), to);
  std::string m;
  for (int i = 0; i < 300; ++i) {
    m = on_io([&] { return ea->metrics_text(); });
    if (m.find("weft_p2p_udp_datagrams_total 3") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling interval
  }
  // Neither STUN nor a probe, from an address no probe verified: dropped before QUIC sees it.
  EXPECT_NE(m.find("weft_p2p_unknown_source_total 2"), std::string::npos) << m;
  EXPECT_NE(m.find("weft_p2p_probes_rejected_total 1"), std::string::npos) << m;
}

}  // namespace
}  // namespace weft::test
