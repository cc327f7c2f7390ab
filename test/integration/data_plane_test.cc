// End-to-end: real weft processes on loopback carrying real TCP through HBONE (mTLS + HTTP/2).
#include <signal.h>

#include <boost/asio.hpp>
#include <boost/json.hpp>
#include <future>

#include "integration/mesh_fixture.h"

namespace weft::test {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

// Deterministic bytes, so the reader can check what it gets without keeping a copy.
struct ByteStream {
  uint64_t state;
  explicit ByteStream(uint64_t seed) : state(seed | 1) {}
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  void fill(char* p, size_t n) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
      uint64_t v = next();
      std::memcpy(p + i, &v, 8);
    }
  }
};

// FNV-1a over the byte stream, chunk boundaries do not matter.
struct Checksum {
  uint64_t h = 1469598103934665603ull;
  void add(const char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 1099511628211ull;
  }
};

// Sends `total` bytes and reads the echo at the same time; returns {sent checksum, received
// checksum, bytes received}.
std::tuple<uint64_t, uint64_t, uint64_t> stream_through(uint16_t port, uint64_t total) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(asio::ip::address_v4::loopback(), port));
  auto writer = std::async(std::launch::async, [&] {
    ByteStream gen(42);
    Checksum sum;
    std::vector<char> buf(1 << 20);
    for (uint64_t sent = 0; sent < total;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), total - sent));
      gen.fill(buf.data(), buf.size());
      sum.add(buf.data(), n);
      asio::write(s, asio::buffer(buf.data(), n));
      sent += n;
    }
    s.shutdown(tcp::socket::shutdown_send);
    return sum.h;
  });
  Checksum got;
  uint64_t received = 0;
  std::vector<char> buf(1 << 20);
  boost::system::error_code ec;
  for (;;) {
    const size_t n = s.read_some(asio::buffer(buf), ec);
    got.add(buf.data(), n);
    received += n;
    if (ec) break;
  }
  return {writer.get(), got.h, received};
}

TEST_F(MeshTest, EchoThroughTwoProxiesWithIdentitiesLogged) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "hello mesh"), "hello mesh");
  EXPECT_EQ(echo_.accepted(), 1u);

  // Both access logs name the peer's SPIFFE identity and the bytes each way.
  const auto poll_log = [](WeftProxy& p, const std::string& needle) {
    for (int i = 0; i < 500 && p.access_log().find(needle) == std::string::npos; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return p.access_log();
  };
  const std::string alog = poll_log(*a, "\"result\":\"ok\"");
  EXPECT_NE(alog.find("\"peer_identity\":\"" + pki_.server_id + "\""), std::string::npos) << alog;
  EXPECT_NE(alog.find("\"bytes_received\":10"), std::string::npos) << alog;
  const std::string blog = poll_log(*b, "\"result\":\"ok\"");
  EXPECT_NE(blog.find("\"peer_identity\":\"" + pki_.client_id + "\""), std::string::npos) << blog;

  const auto prom = http_request(a->admin(), "GET", "/stats/prometheus");
  EXPECT_EQ(prom.status, 200);
  EXPECT_NE(
      prom.body.find("istio_tcp_connections_opened_total{reporter=\"source\",source_principal=\"" +
                     pki_.client_id + "\",destination_principal=\"" + pki_.server_id + "\""),
      std::string::npos)
      << prom.body;
  EXPECT_NE(prom.body.find("# TYPE istio_tcp_sent_bytes_total counter"), std::string::npos);
  EXPECT_NE(prom.body.find("weft_hbone_connections_active"), std::string::npos);
}

TEST_F(MeshTest, OneGibibyteEachWayWithChecksums) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  const uint64_t total = sanitized() ? (64ull << 20) : (1ull << 30);
  if (sanitized()) std::fprintf(stderr, "NOTE: sanitizer build moves 64 MiB instead of 1 GiB\n");
  auto [sent, got, received] = stream_through(a->port("outbound/app"), total);
  EXPECT_EQ(received, total);
  EXPECT_EQ(sent, got);
}

TEST_F(MeshTest, ThousandConcurrentConnections) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  const uint16_t port = a->port("outbound/app");
  asio::io_context io;
  std::vector<tcp::socket> sockets;
  for (int i = 0; i < 1000; ++i) {
    sockets.emplace_back(io);
    sockets.back().connect(tcp::endpoint(asio::ip::address_v4::loopback(), port));
  }
  // All 1000 are open at once before any finishes.
  for (int i = 0; i < 1000; ++i)
    asio::write(sockets[i], asio::buffer("conn-" + std::to_string(i) + ";"));
  int ok = 0;
  for (int i = 0; i < 1000; ++i) {
    const std::string want = "conn-" + std::to_string(i) + ";";
    std::string got(want.size(), '\0');
    boost::system::error_code ec;
    asio::read(sockets[i], asio::buffer(got), ec);
    ok += (!ec && got == want);
  }
  EXPECT_EQ(ok, 1000);
  EXPECT_EQ(echo_.accepted(), 1000u);
  // They shared pooled tunnels instead of one TLS connection each.
  EXPECT_LE(b->stat("hbone_connections_active"), 40u);
}

TEST_F(MeshTest, HalfCloseLetsTheServerAnswerAfterClientFinished) {
  // An app that reads to EOF, then answers: it only works if the client's FIN crosses the
  // mesh while the way back stays open.
  asio::io_context sio;
  tcp::acceptor acc(sio, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  const uint16_t app_port = acc.local_endpoint().port();
  auto server = std::async(std::launch::async, [&] {
    tcp::socket s = acc.accept();
    std::string in;
    boost::system::error_code ec;
    char buf[4096];
    for (;;) {
      size_t n = s.read_some(asio::buffer(buf), ec);
      in.append(buf, n);
      if (ec) break;
    }
    asio::write(s, asio::buffer("received " + std::to_string(in.size()) + " bytes"));
    s.shutdown(tcp::socket::shutdown_send);
    return in;
  });
  const std::string target = "127.0.0.1:" + std::to_string(app_port);
  auto b = start_server("", "    - authority: " + target + "\n      address: " + target + "\n");
  auto a = start_client(b->port("inbound"), "client", target);
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), std::string(100000, 'x')),
            "received 100000 bytes");
  EXPECT_EQ(server.get().size(), 100000u);
}

TEST_F(MeshTest, RefusingBackendClosesClientAndIsLogged) {
  const std::string dead = "127.0.0.1:" + std::to_string(unused_port());
  auto b = start_server("", "    - authority: " + dead + "\n      address: " + dead + "\n");
  auto a = start_client(b->port("inbound"), "client", dead);
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "anyone?"), "");
  for (int i = 0; i < 500 && b->access_log().find("upstream_connect_failed") == std::string::npos;
       ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_NE(b->access_log().find("upstream_connect_failed"), std::string::npos) << b->access_log();
  for (int i = 0; i < 500 && a->access_log().find("upstream_refused_503") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_NE(a->access_log().find("upstream_refused_503"), std::string::npos) << a->access_log();
}

TEST_F(MeshTest, UpstreamProxyRestartIsReconnected) {
  auto b = start_server();
  const uint16_t b_port = b->port("inbound");
  auto a = start_client(b_port);
  const uint16_t app = a->port("outbound/app");
  EXPECT_EQ(echo_roundtrip(app, "one"), "one");
  b->signal(SIGKILL);
  b->wait_exit();
  EXPECT_EQ(echo_roundtrip(app, "two"), "");  // closed, with the reason in A's access log
  auto b2 = start_server("", "", "127.0.0.1:" + std::to_string(b_port), "b2");
  EXPECT_EQ(echo_roundtrip(app, "three"), "three");
}

TEST_F(MeshTest, RotatedCertificateIsPickedUpWithoutRestart) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  const auto serial_of = [&] {
    auto v = boost::json::parse(http_request(b->admin(), "GET", "/certs").body);
    return std::string(v.at("certificate").at("serial").as_string().c_str());
  };
  const std::string before = serial_of();
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "before"), "before");
  auto r = run_weft({"cert", "issue", "--ca", (pki_.dir / "ca").string(), "--spiffe-id",
                     pki_.server_id, "--out", (pki_.dir / "server").string(), "--ttl", "48h"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string after = before;
  for (int i = 0; i < 500 && after == before; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    after = serial_of();
  }
  EXPECT_NE(after, before);
  EXPECT_EQ(b->wait_stat("certificate_reloads", 1), 1u);
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "after"), "after");
}

TEST_F(MeshTest, SigtermDrainsInFlightConnectionsThenExitsZero) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  asio::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(asio::ip::address_v4::loopback(), a->port("outbound/app")));
  asio::write(s, asio::buffer(std::string("first half;")));
  std::string got(11, '\0');
  asio::read(s, asio::buffer(got));
  a->signal(SIGTERM);
  // Not ready any more, but the open connection keeps working until it finishes.
  int ready = 200;
  for (int i = 0; i < 500 && ready == 200; ++i) {
    try {
      ready = http_request(a->admin(), "GET", "/ready").status;
    } catch (const std::exception&) {
      ready = 0;
    }
  }
  EXPECT_NE(ready, 200);
  asio::write(s, asio::buffer(std::string("second half")));
  s.shutdown(tcp::socket::shutdown_send);
  std::string rest;
  boost::system::error_code ec;
  char buf[256];
  for (;;) {
    size_t n = s.read_some(asio::buffer(buf), ec);
    rest.append(buf, n);
    if (ec) break;
  }
  EXPECT_EQ(rest, "second half");
  EXPECT_EQ(a->wait_exit(), 0) << a->log();
}

TEST_F(MeshTest, DrainDeadlineClosesOpenTunnelsAndExits) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  // A short drain deadline, applied live.
  const auto a_yaml = dir_ / "a.yaml";
  std::string yaml = read_file(a_yaml);
  yaml.replace(yaml.find("drain_timeout: 10s"), 18, "drain_timeout: 300ms");
  write_file(a_yaml, yaml);
  a->signal(SIGHUP);
  EXPECT_GE(a->wait_stat("config_reloads", 1), 1u) << a->log();
  // A connection that never finishes keeps a tunnel stream open past the deadline.
  asio::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(asio::ip::address_v4::loopback(), a->port("outbound/app")));
  asio::write(s, asio::buffer(std::string("hold")));
  std::string got(4, '\0');
  asio::read(s, asio::buffer(got));
  a->signal(SIGTERM);
  EXPECT_EQ(a->wait_exit(), 0) << a->log();
  EXPECT_NE(a->log().find("drain deadline reached"), std::string::npos) << a->log();
  // The held connection is closed, not left hanging.
  boost::system::error_code ec;
  char buf[16];
  s.read_some(asio::buffer(buf), ec);
  EXPECT_TRUE(ec) << "the proxy closed it";
  // Under ASan, LeakSanitizer checks at exit that the tunnel and its stream were freed; the
  // fixture fails on any sanitizer report in the log.
}

TEST_F(MeshTest, SighupAppliesGoodConfigAndRefusesBadOne) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  const uint16_t app = a->port("outbound/app");
  const auto b_yaml = dir_ / "b.yaml";
  const std::string good = read_file(b_yaml);

  // Bad: the old config keeps serving, the error is logged and counted.
  write_file(b_yaml, good + "bogus_field: 1\n");
  b->signal(SIGHUP);
  for (int i = 0; i < 500 && b->stat("config_reload_failures") == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(b->stat("config_reload_failures"), 1u);
  EXPECT_NE(b->log().find("reload refused"), std::string::npos);
  EXPECT_EQ(echo_roundtrip(app, "still up"), "still up");

  // Good: the policy change applies (client no longer allowed), established tunnels stay.
  asio::io_context io;
  tcp::socket open_conn(io);
  open_conn.connect(tcp::endpoint(asio::ip::address_v4::loopback(), app));
  asio::write(open_conn, asio::buffer(std::string("x")));
  char c;
  asio::read(open_conn, asio::buffer(&c, 1));
  write_file(b_yaml, server_config("      allow: [" + pki_.other_id + "]\n", "",
                                   "127.0.0.1:" + std::to_string(b->port("inbound"))));
  b->signal(SIGHUP);
  for (int i = 0; i < 500 && b->stat("config_reloads") == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(b->stat("config_reloads"), 1u) << b->log();
  // Workers pick the new snapshot up asynchronously; within a moment new streams are denied.
  std::string reply = "not yet";
  for (int i = 0; i < 200 && !reply.empty(); ++i) reply = echo_roundtrip(app, "denied now");
  EXPECT_EQ(reply, "");
  asio::write(open_conn, asio::buffer(std::string("y")));
  asio::read(open_conn, asio::buffer(&c, 1));
  EXPECT_EQ(c, 'y');
}

TEST_F(MeshTest, PlainL4ListenerForwardsWithSplice) {
  const auto path = dir_ / "l4.yaml";
  write_file(path,
             "workers: 1\nadmin: {listen: 127.0.0.1:0}\nl4:\n  - {name: plain, listen: "
             "127.0.0.1:0, upstream: " +
                 echo_authority() + "}\n");
  WeftProxy p(path, dir_.path());
  ASSERT_TRUE(p.wait_ready());
  EXPECT_EQ(echo_roundtrip(p.port("l4/plain"), "plain bytes"), "plain bytes");
  auto [sent, got, received] = stream_through(p.port("l4/plain"), 64ull << 20);
  EXPECT_EQ(received, 64ull << 20);
  EXPECT_EQ(sent, got);
}

}  // namespace
}  // namespace weft::test
