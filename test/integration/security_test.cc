// Each refusal must reach no byte to the app, and leave the proxy up with a counter raised.
#include <sys/stat.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <random>

#include "identity/certificate_authority.h"
#include "integration/mesh_fixture.h"

namespace weft::test {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

std::string wait_for_log(WeftProxy& p, const std::string& needle) {
  for (int i = 0; i < 500 && p.access_log().find(needle) == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return p.access_log();
}

TEST_F(MeshTest, CertificateFromAnotherCaIsRefused) {
  Pki foreign(dir_ / "foreign");  // same trust domain name, different CA
  auto b = start_server();
  const auto path = dir_ / "a.yaml";
  write_file(
      path,
      foreign.identity_yaml("client") +
          "admin: {listen: 127.0.0.1:0}\nservices:\n  - name: echo\n    addresses: [127.0.0.1:" +
          std::to_string(b->port("inbound")) + "]\n    authority: " + echo_authority() +
          "\n    spiffe_ids: [" + pki_.server_id +
          "]\noutbound:\n  - {name: app, listen: 127.0.0.1:0, service: echo}\n");
  WeftProxy a(path, dir_.path());
  ASSERT_TRUE(a.wait_ready());
  EXPECT_EQ(echo_roundtrip(a.port("outbound/app"), "let me in"), "");
  EXPECT_EQ(echo_.accepted(), 0u);
  EXPECT_GE(b->wait_stat("tls_handshake_errors", 1), 1u);
  EXPECT_TRUE(b->running());
}

TEST_F(MeshTest, SpiffeIdNotAllowedGets401AndNoByteReachesTheApp) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"), "other");
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "secret"), "");
  EXPECT_NE(wait_for_log(*a, "upstream_refused_401").find("upstream_refused_401"),
            std::string::npos);
  EXPECT_NE(wait_for_log(*b, "denied_by_policy").find("denied_by_policy"), std::string::npos);
  EXPECT_EQ(echo_.accepted(), 0u);
}

TEST_F(MeshTest, DenyListWinsOverAllowList) {
  auto b =
      start_server("      allow: [" + pki_.client_id + "]\n      deny: [" + pki_.client_id + "]\n");
  auto a = start_client(b->port("inbound"));
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "x"), "");
  EXPECT_NE(wait_for_log(*a, "upstream_refused_401").find("upstream_refused_401"),
            std::string::npos);
  EXPECT_EQ(echo_.accepted(), 0u);
}

TEST_F(MeshTest, UnconfiguredTargetGets400NeverAnOpenProxy) {
  auto b = start_server();
  // Ask B to connect to its own admin port: a target it was never told to serve.
  auto a = start_client(b->port("inbound"), "client", b->admin());
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "GET /quitquitquit"), "");
  EXPECT_NE(wait_for_log(*a, "upstream_refused_400").find("upstream_refused_400"),
            std::string::npos);
  EXPECT_NE(wait_for_log(*b, "unknown_target").find("unknown_target"), std::string::npos);
  EXPECT_TRUE(b->running());
}

TEST_F(MeshTest, ServerWithUnexpectedIdentityIsRefusedByTheClient) {
  auto b = start_server();
  // A expects the "other" identity, B presents "server".
  const auto path = dir_ / "a.yaml";
  write_file(
      path,
      pki_.identity_yaml("client") +
          "admin: {listen: 127.0.0.1:0}\nservices:\n  - name: echo\n    addresses: [127.0.0.1:" +
          std::to_string(b->port("inbound")) + "]\n    authority: " + echo_authority() +
          "\n    spiffe_ids: [" + pki_.other_id +
          "]\noutbound:\n  - {name: app, listen: 127.0.0.1:0, service: echo}\n");
  WeftProxy a(path, dir_.path());
  ASSERT_TRUE(a.wait_ready());
  EXPECT_EQ(echo_roundtrip(a.port("outbound/app"), "x"), "");
  EXPECT_NE(wait_for_log(a, "upstream_connect_failed").find("not in services.echo.spiffe_ids"),
            std::string::npos)
      << a.access_log();
  EXPECT_EQ(echo_.accepted(), 0u);
}

TEST_F(MeshTest, ExpiredCertificateIsRefusedAtStartup) {
  IssueOptions o;
  o.ca_dir = pki_.dir / "ca";
  o.spiffe_id = pki_.client_id;
  o.out_dir = pki_.dir / "expired";
  o.ttl = std::chrono::hours(1);
  o.not_before_offset = -std::chrono::hours(48);
  issue_certificate(o);
  const auto path = dir_ / "a.yaml";
  write_file(
      path,
      pki_.identity_yaml("expired") +
          "admin: {listen: 127.0.0.1:0}\nservices:\n  - name: echo\n    addresses: [127.0.0.1:1]\n"
          "    authority: 127.0.0.1:1\n    spiffe_ids: [" +
          pki_.server_id + "]\noutbound:\n  - {name: app, listen: 127.0.0.1:0, service: echo}\n");
  WeftProxy a(path, dir_.path());
  EXPECT_EQ(a.wait_exit(), 1);
  EXPECT_NE(a.log().find("certificate has expired"), std::string::npos) << a.log();
}

TEST_F(MeshTest, GarbageAndTruncationOnEveryPortCloseTheConnectionOnly) {
  auto b = start_server();
  auto a = start_client(b->port("inbound"));
  std::mt19937 rng(7);
  std::string garbage(4096, '\0');
  for (auto& ch : garbage) ch = static_cast<char>(rng());
  const auto blast = [&](uint16_t port, const std::string& bytes) {
    asio::io_context io;
    tcp::socket s(io);
    s.connect(tcp::endpoint(asio::ip::address_v4::loopback(), port));
    boost::system::error_code ec;
    asio::write(s, asio::buffer(bytes), ec);
    s.shutdown(tcp::socket::shutdown_send, ec);
    char buf[4096];
    while (!ec) s.read_some(asio::buffer(buf), ec);  // the proxy must close it
  };
  const uint16_t inbound = b->port("inbound");
  const uint16_t admin_port =
      static_cast<uint16_t>(std::stoi(b->admin().substr(b->admin().rfind(':') + 1)));
  blast(inbound, garbage);
  blast(inbound,
        std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11));  // truncated ClientHello
  blast(admin_port, garbage);
  EXPECT_GE(b->wait_stat("tls_handshake_errors", 2), 2u);

  // Truncated and bogus HTTP/2 after a good mTLS handshake.
  const auto h2_garbage = [&](const std::string& payload) {
    asio::io_context io;
    asio::ssl::context ctx(asio::ssl::context::tls_client);
    ctx.use_certificate_chain_file((pki_.dir / "client" / "cert.pem").string());
    ctx.use_private_key_file((pki_.dir / "client" / "key.pem").string(), asio::ssl::context::pem);
    ctx.load_verify_file((pki_.dir / "client" / "ca.crt").string());
    const unsigned char alpn[] = {2, 'h', '2'};
    SSL_CTX_set_alpn_protos(ctx.native_handle(), alpn, sizeof alpn);
    asio::ssl::stream<tcp::socket> s(io, ctx);
    s.lowest_layer().connect(tcp::endpoint(asio::ip::address_v4::loopback(), inbound));
    s.handshake(asio::ssl::stream_base::client);
    boost::system::error_code ec;
    asio::write(s, asio::buffer(payload), ec);
    s.lowest_layer().shutdown(tcp::socket::shutdown_send, ec);  // truncated: nothing more comes
    ec = {};
    char buf[4096];
    for (int i = 0; i < 100 && !ec; ++i) s.read_some(asio::buffer(buf), ec);
    EXPECT_TRUE(ec) << "the proxy kept a connection open after bad HTTP/2";
  };
  h2_garbage("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + garbage);
  h2_garbage("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x10\x01\x04\x00\x00\x00\x01garbage");
  h2_garbage(garbage);
  EXPECT_GE(b->wait_stat("hbone_protocol_errors", 2), 2u);

  // Still serving.
  EXPECT_TRUE(b->running());
  EXPECT_TRUE(a->running());
  EXPECT_EQ(echo_roundtrip(a->port("outbound/app"), "still fine"), "still fine");
  EXPECT_EQ(http_request(b->admin(), "GET", "/ready").status, 200);
}

TEST_F(MeshTest, SilentPeerMidHandshakeDoesNotBlockShutdown) {
  auto b = start_server();
  asio::io_context io;
  tcp::socket silent(io);
  silent.connect(tcp::endpoint(asio::ip::address_v4::loopback(), b->port("inbound")));
  asio::write(silent,
              asio::buffer(std::string("\x16\x03\x01", 3)));  // a handshake that never completes
  // Wait until B has accepted it (the handshake is then in flight), then stop B.
  EXPECT_GE(b->wait_stat("downstream_connections_total", 1), 1u);
  b->signal(SIGTERM);
  EXPECT_EQ(b->wait_exit(), 0)
      << b->log();  // and, under ASan, nothing leaked (checked at teardown)
}

TEST_F(MeshTest, AdminOnlyAcceptsPostForStateChanges) {
  auto b = start_server();
  EXPECT_EQ(http_request(b->admin(), "GET", "/drain").status, 405);
  EXPECT_EQ(http_request(b->admin(), "GET", "/quitquitquit").status, 405);
  EXPECT_EQ(http_request(b->admin(), "GET", "/nope").status, 404);
  const auto dump = http_request(b->admin(), "GET", "/config_dump");
  EXPECT_EQ(dump.status, 200);
  EXPECT_EQ(dump.body.find("PRIVATE KEY"), std::string::npos);
  EXPECT_EQ(http_request(b->admin(), "POST", "/quitquitquit").status, 200);
  EXPECT_EQ(b->wait_exit(), 0);
}

}  // namespace
}  // namespace weft::test
