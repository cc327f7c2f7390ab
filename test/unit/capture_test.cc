// Capture's parsers and decisions: detection on real ClientHellos (made by OpenSSL) and
// request heads, the SOCKS5 and HTTP proxy handshakes, routing, and the iptables plans.
#include <gtest/gtest.h>
#include <openssl/ssl.h>

#include <algorithm>

#include "config/proxy_config.h"
#include "proxy/capture/capture.h"
#include "proxy/capture/explicit_proxy.h"
#include "proxy/capture/iptables_rules.h"
#include "proxy/capture/sniff.h"

namespace weft {
namespace {

// The bytes an OpenSSL client sends first, with `sni` (none if empty).
std::string client_hello(const std::string& sni) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL* ssl = SSL_new(ctx);
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, in, out);
  if (!sni.empty()) SSL_set_tlsext_host_name(ssl, sni.c_str());
  SSL_connect(ssl);  // wants to read: the ClientHello is in `out`
  char* data = nullptr;
  const long n = BIO_get_mem_data(out, &data);
  std::string hello(data, static_cast<size_t>(n));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return hello;
}

sniff::Detected detect(std::string_view s) {
  return sniff::detect(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(Sniff, ReadsTheSniOfARealClientHello) {
  const auto hello = client_hello("Reviews.Default.svc");
  auto d = detect(hello);
  EXPECT_EQ(d.protocol, sniff::Protocol::tls);
  EXPECT_EQ(d.sni, "reviews.default.svc");
  // Every strict prefix waits for more; without SNI it is TLS all the same.
  for (size_t n : {size_t(1), size_t(5), size_t(9), hello.size() / 2, hello.size() - 1})
    EXPECT_EQ(detect(hello.substr(0, n)).protocol, sniff::Protocol::need_more) << n;
  auto none = detect(client_hello(""));
  EXPECT_EQ(none.protocol, sniff::Protocol::tls);
  EXPECT_EQ(none.sni, "");
}

TEST(Sniff, ReadsHttp1HostAndMethodAndKnowsThePreface) {
  auto d = detect("GET /a?b HTTP/1.1\r\nUser-Agent: x\r\nHOST:  Web.Mesh:8080 \r\n\r\n");
  EXPECT_EQ(d.protocol, sniff::Protocol::http1);
  EXPECT_EQ(d.method, "GET");
  EXPECT_EQ(d.target, "/a?b");
  EXPECT_EQ(d.host, "web.mesh:8080");
  EXPECT_EQ(detect("GET / HTTP/1.1\r\nHost: x\r\n").protocol, sniff::Protocol::need_more);
  EXPECT_EQ(detect("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").protocol, sniff::Protocol::http2);
  EXPECT_EQ(detect("PRI * HTTP/2").protocol, sniff::Protocol::need_more);
}

TEST(Sniff, ServerFirstAndBinaryProtocolsAreOpaqueAtOnce) {
  EXPECT_EQ(detect("SSH-2.0-OpenSSH_9.2\r\n").protocol, sniff::Protocol::opaque);
  EXPECT_EQ(detect(std::string("\x00\x00\x00\x08\x04\xd2\x16\x2f", 8)).protocol,
            sniff::Protocol::opaque);  // PostgreSQL SSLRequest
  EXPECT_EQ(detect("get / HTTP/1.1\r\n\r\n").protocol, sniff::Protocol::opaque);
  EXPECT_EQ(detect("GET / HTTP/3\r\n\r\n").protocol, sniff::Protocol::opaque);
  EXPECT_EQ(detect(std::string("\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", 10)).protocol,
            sniff::Protocol::opaque);  // a handshake record that is no ClientHello
}

TEST(Socks5, ParsesEachStageAndSaysWhatIsWrong) {
  auto g = socks5::parse_greeting(reinterpret_cast<const uint8_t*>("\x05\x02\x00\x02"), 4);
  ASSERT_TRUE(g.ok() && *g);
  EXPECT_EQ((*g)->consumed, 4u);
  EXPECT_EQ((*g)->methods, (std::vector<uint8_t>{0, 2}));
  EXPECT_FALSE(*socks5::parse_greeting(reinterpret_cast<const uint8_t*>("\x05\x02\x00"), 3));
  auto bad = socks5::parse_greeting(reinterpret_cast<const uint8_t*>("\x04\x01"), 2);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().find("version 5"), std::string::npos);

  const std::string creds(
      "\x01\x05"
      "alice\x06"
      "s3cret",
      14);
  auto c = socks5::parse_credentials(reinterpret_cast<const uint8_t*>(creds.data()), creds.size());
  ASSERT_TRUE(c.ok() && *c);
  EXPECT_EQ((*c)->user, "alice");
  EXPECT_EQ((*c)->password, "s3cret");

  const std::string by_name(
      "\x05\x01\x00\x03\x08"
      "Web.Mesh\x00\x50",
      15);
  auto r = socks5::parse_request(reinterpret_cast<const uint8_t*>(by_name.data()), by_name.size());
  ASSERT_TRUE(r.ok() && *r) << (r.ok() ? "" : r.error());
  EXPECT_TRUE((*r)->by_name);
  EXPECT_EQ((*r)->target.to_string(), "web.mesh:80");
  EXPECT_EQ((*r)->consumed, by_name.size());
  const std::string v6("\x05\x01\x00\x04\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\x01\xbb", 22);
  auto r6 = socks5::parse_request(reinterpret_cast<const uint8_t*>(v6.data()), v6.size());
  ASSERT_TRUE(r6.ok() && *r6);
  EXPECT_EQ((*r6)->target.to_string(), "[::1]:443");
  const std::string evil(
      "\x05\x01\x00\x03\x05"
      "a b/c\x00\x50",
      12);
  EXPECT_FALSE(
      socks5::parse_request(reinterpret_cast<const uint8_t*>(evil.data()), evil.size()).ok());
}

TEST(HttpProxy, ConnectAndAbsoluteUrisAndTheirRewrite) {
  auto c = http_proxy::parse_request(
      "CONNECT Web.Mesh:443 HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\n\r\nearly");
  ASSERT_TRUE(c.ok() && *c);
  EXPECT_TRUE((*c)->connect);
  EXPECT_EQ((*c)->target.to_string(), "web.mesh:443");
  EXPECT_EQ((*c)->proxy_authorization, "Basic eA==");
  EXPECT_EQ((*c)->head_len, 66u);  // "early" stays in the socket

  auto g = http_proxy::parse_request(
      "GET http://web.mesh/x?y=1#f HTTP/1.1\r\nHost: web.mesh\r\nProxy-Connection: keep-alive\r\n"
      "Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n");
  ASSERT_TRUE(g.ok() && *g);
  EXPECT_EQ((*g)->target.to_string(), "web.mesh:80");
  EXPECT_EQ((*g)->origin_head, "GET /x?y=1 HTTP/1.1\r\nHost: web.mesh\r\nAccept: */*\r\n\r\n");

  for (const char* bad : {"GET / HTTP/1.1\r\n\r\n", "GET http://u@h/ HTTP/1.1\r\n\r\n",
                          "CONNECT h HTTP/1.1\r\n\r\n", "\x16\x03\x01 x\r\n\r\n"}) {
    auto r = http_proxy::parse_request(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_EQ(r.error().substr(0, 4), "400 ");
    }
  }
  EXPECT_FALSE(*http_proxy::parse_request("GET http://a/ HTTP/1.1\r\nHost: a\r\n"));
}

TEST(CaptureRoute, NamesFirstThenAddressesThenEgressPolicy) {
  ProxyConfig c;
  ServiceConfig web;
  web.name = "web";
  web.destinations = {{"web.mesh", 80}, {"10.96.0.10", 80}};
  c.services.push_back(web);
  EXPECT_EQ(route_captured(c, "web.mesh", {"10.1.1.1", 80}).service->name, "web");
  EXPECT_EQ(route_captured(c, "", {"10.96.0.10", 80}).service->name, "web");
  EXPECT_EQ(route_captured(c, "web.mesh", {"10.1.1.1", 81}).egress->to_string(), "10.1.1.1:81");
  c.capture.egress_allowed = false;
  auto denied = route_captured(c, "other", {"10.1.1.1", 80});
  EXPECT_EQ(denied.service, nullptr);
  EXPECT_NE(denied.denied.find("egress_denied"), std::string::npos);
  EXPECT_EQ(split_host_header("Web:8080", 80)->to_string(), "Web:8080");
  EXPECT_EQ(split_host_header("[::1]", 80)->to_string(), "[::1]:80");
  EXPECT_FALSE(split_host_header("a b", 80));
}

TEST(IptablesRules, InstallIsIdempotentByConstructionAndRemoveUndoesIt) {
  iptables::CaptureRules r;
  r.proxy_uid = 1337;
  r.exclude_ports = {22};
  r.exclude_cidrs = {"10.0.0.0/8", "fd00::/8"};
  const auto plan = iptables::install_plan(r, false);
  // Chains are flushed before they are filled; the jump is added only when missing.
  auto flush = std::find_if(plan.begin(), plan.end(), [](const auto& s) {
    return s.command == iptables::Command{"-t", "nat", "-F", "WEFT_OUTPUT"};
  });
  ASSERT_NE(flush, plan.end());
  size_t jumps = 0, v6_cidrs = 0;
  for (const auto& s : plan) {
    if (std::find(s.command.begin(), s.command.end(), "OUTPUT") != s.command.end()) {
      ++jumps;
      EXPECT_TRUE(s.only_if_missing);
    }
    if (std::find(s.command.begin(), s.command.end(), "fd00::/8") != s.command.end()) ++v6_cidrs;
  }
  EXPECT_EQ(jumps, 1u);
  EXPECT_EQ(v6_cidrs, 0u);  // IPv6 CIDRs go to ip6tables only
  EXPECT_EQ(iptables::validate(r), "");
  r.exclude_cidrs = {"10.0.0.0/33"};
  EXPECT_NE(iptables::validate(r).find("10.0.0.0/33"), std::string::npos);
  for (const auto& s : iptables::remove_plan(false)) EXPECT_TRUE(s.may_fail);
}

TEST(CaptureConfig, ParsesAndRefusesAnOpenProxy) {
  const std::string base =
      "services:\n  - name: web\n    addresses: ['127.0.0.1:15008']\n    authority: 'web:80'\n"
      "    spiffe_ids: ['spiffe://t.test/ns/a/sa/b']\n    destinations: ['Web.Mesh:80']\n"
      "identity: {cert: c, key: k, ca: a}\n";
  auto c = parse_proxy_config(base +
                                  "capture: {transparent: 127.0.0.1:15001, explicit: "
                                  "127.0.0.1:15080, opaque_ports: [5432], egress: deny}\n",
                              "t.yaml", "/");
  ASSERT_TRUE(c.capture.transparent);
  EXPECT_EQ(c.services[0].destinations[0].to_string(), "web.mesh:80");
  EXPECT_EQ(c.capture.opaque_ports, std::vector<uint16_t>{5432});
  EXPECT_FALSE(c.capture.egress_allowed);
  EXPECT_FALSE(c.capture.inbound_plaintext_allowed);  // STRICT unless said otherwise
  try {
    parse_proxy_config(base + "capture: {explicit: 0.0.0.0:15080}\n", "t.yaml", "/");
    FAIL() << "an unauthenticated explicit proxy on 0.0.0.0 was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("no open proxy"), std::string::npos) << e.what();
  }
  try {
    parse_proxy_config(base + "capture: {transparent: 127.0.0.1:1, detect_timeout: 5s}\n", "t.yaml",
                       "/");
    FAIL() << "a 5 s detection timeout was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("capture.detect_timeout"), std::string::npos);
  }
}

}  // namespace
}  // namespace weft
