#include <gtest/gtest.h>

#include "config/proxy_config.h"
#include "core/duration.h"
#include "core/host_port.h"
#include "identity/spiffe_id.h"
#include "proxy/policy/connect_policy.h"

namespace weft {
namespace {

TEST(SpiffeId, AcceptsTheIstioForm) {
  auto id = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/echo");
  ASSERT_TRUE(id.ok()) << id.error();
  EXPECT_EQ(id->trust_domain, "cluster.local");
  EXPECT_EQ(id->ns, "default");
  EXPECT_EQ(id->service_account, "echo");
  EXPECT_EQ(id->to_string(), "spiffe://cluster.local/ns/default/sa/echo");
}

TEST(SpiffeId, RejectsEverythingElseWithTheExpectedForm) {
  for (const char* bad :
       {"", "spiffe://", "spiffe://td", "spiffe://td/ns/a/sa/b/", "spiffe://td/ns/a/sa",
        "spiffe://td/ns/a/sa/", "spiffe://td/sa/a/ns/b", "spiffe://Td/ns/a/sa/b",
        "spiffe://td/ns/a/sa/b/c", "spiffe://td/ns/a b/sa/b", "https://td/ns/a/sa/b",
        "spiffe://td/ns/a/sa/b?x", "spiffe:///ns/a/sa/b"}) {
    auto id = parse_spiffe_id(bad);
    EXPECT_FALSE(id.ok()) << bad;
    if (!id.ok()) {
      EXPECT_NE(id.error().find(kSpiffeIdForm), std::string::npos) << id.error();
    }
  }
  EXPECT_NE(parse_spiffe_id("spiffe://td/ns/a/sa/b/").error().find("trailing slash"),
            std::string::npos);
}

TEST(HostPort, ParsesV4V6AndNames) {
  EXPECT_EQ(parse_host_port("127.0.0.1:80")->port, 80);
  EXPECT_EQ(parse_host_port("[::1]:8080")->host, "::1");
  EXPECT_EQ(parse_host_port("[::1]:8080")->to_string(), "[::1]:8080");
  EXPECT_EQ(parse_host_port("echo.default.svc:9000")->host, "echo.default.svc");
  for (const char* bad : {"", ":80", "host", "host:", "host:0", "host:65536", "host:-1", "::1:80",
                          "[::1]80", "a b:80", "host:80x", "[zz]:80"})
    EXPECT_FALSE(parse_host_port(bad).ok()) << bad;
  EXPECT_TRUE(parse_host_port("127.0.0.1:0", true).ok());
}

TEST(Duration, ParsesUnits) {
  EXPECT_EQ(parse_duration("250ms")->count(), 250);
  EXPECT_EQ(parse_duration("10s")->count(), 10000);
  EXPECT_EQ(parse_duration("24h")->count(), 86400000);
  for (const char* bad : {"", "10", "s", "1.5s", "-1s", "10 s", "10sec"})
    EXPECT_FALSE(parse_duration(bad).ok()) << bad;
  EXPECT_EQ(format_duration(std::chrono::hours(24)), "24h");
}

std::string error_of(const std::string& yaml) {
  try {
    parse_proxy_config(yaml, "t.yaml", "/tmp");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(ProxyConfig, ErrorsNameLineFieldAndFix) {
  EXPECT_EQ(
      error_of("l4:\n  - {name: a, listen: 127.0.0.1:1, upstream: 127.0.0.1:2, extra: 1}\n"),
      "t.yaml:2:59: field 'l4[0].extra': unknown field; expected one of: name, listen, upstream");
  EXPECT_NE(error_of("workers: many\nl4: []\n")
                .find("t.yaml:1:10: field 'workers': expected a whole number"),
            std::string::npos);
  EXPECT_NE(error_of("key: [unclosed\n").find("not valid YAML"), std::string::npos);
  EXPECT_NE(error_of("").find("empty"), std::string::npos);
  EXPECT_NE(error_of("inbound: {targets: [{address: 127.0.0.1:1}]}\n")
                .find("field 'identity': is required"),
            std::string::npos);
  EXPECT_NE(error_of("services:\n  - {name: s, addresses: [127.0.0.1:1], authority: a:1, "
                     "spiffe_ids: [spiffe://x/ns/a]}\n")
                .find("services[0].spiffe_ids[0]"),
            std::string::npos);
  EXPECT_NE(error_of("l4:\n  - {name: a, listen: 127.0.0.1:5, upstream: 127.0.0.1:2}\n"
                     "  - {name: b, listen: 127.0.0.1:5, upstream: 127.0.0.1:2}\n")
                .find("already used"),
            std::string::npos);
}

TEST(ProxyConfig, IdentityFromTheAgentsSdsSocket) {
  const std::string inbound = "inbound: {targets: [{authority: a:1, address: 127.0.0.1:1}]}\n";
  const auto c = parse_proxy_config(
      "identity: {sds: run/sds.sock, namespace: shop, service_account: web}\n" + inbound, "t.yaml",
      "/etc/weft");
  EXPECT_TRUE(c.identity.from_sds());
  EXPECT_EQ(c.identity.sds, "/etc/weft/run/sds.sock");
  EXPECT_EQ(c.identity.sds_service_account, "web");
  EXPECT_NE(error_of("identity: {sds: s, namespace: a, service_account: b, cert: c}\n" + inbound)
                .find("field 'identity.cert': not with 'sds'"),
            std::string::npos);
  EXPECT_NE(error_of("identity: {sds: s, namespace: a}\n" + inbound)
                .find("field 'identity.service_account': is required"),
            std::string::npos);
  EXPECT_NE(error_of("identity: {sds: s, namespace: A/b, service_account: b}\n" + inbound)
                .find("'A/b' is not a valid name"),
            std::string::npos);
  EXPECT_NE(error_of("identity: {cert: c, key: k, ca: a, namespace: x}\n" + inbound)
                .find("go with 'sds'"),
            std::string::npos);
  // Outbound may name a service only the agent knows, once services come from it.
  const std::string outbound = "outbound: [{name: app, listen: 127.0.0.1:0, service: pay}]\n";
  EXPECT_NE(
      error_of("identity: {cert: c, key: k, ca: a}\n" + outbound).find("no service named 'pay'"),
      std::string::npos);
  EXPECT_TRUE(parse_proxy_config("identity: {sds: s, namespace: a, service_account: b}\n"
                                 "services_from_agent: true\n" +
                                     outbound,
                                 "t.yaml", "/")
                  .services_from_agent);
  EXPECT_NE(error_of("identity: {cert: c, key: k, ca: a}\nservices_from_agent: true\n" + outbound)
                .find("needs identity.sds"),
            std::string::npos);
  EXPECT_NE(error_of("services_from_agent: yes\n" + outbound).find("expected true or false"),
            std::string::npos);
}

TEST(ProxyConfig, ParsesAFullConfig) {
  const auto c = parse_proxy_config(R"(
identity: {cert: c.pem, key: k.pem, ca: ca.crt}
workers: 3
pool: {max_streams: 7, idle_timeout: 5s}
services:
  - name: echo
    addresses: [127.0.0.1:15008]
    authority: 10.0.0.1:80
    spiffe_ids: [spiffe://td/ns/a/sa/echo]
outbound:
  - {name: o, listen: 127.0.0.1:0, service: echo}
inbound:
  targets:
    - {address: 127.0.0.1:80, allow: [spiffe://td/ns/a/sa/client]}
)",
                                    "t.yaml", "/etc/weft");
  EXPECT_EQ(c.workers, 3u);
  EXPECT_EQ(c.identity.cert, "/etc/weft/c.pem");
  EXPECT_EQ(c.pool.max_streams, 7u);
  EXPECT_EQ(c.inbound.listen.port, 15008);
  EXPECT_EQ(c.inbound.targets[0].authority, "127.0.0.1:80");
  EXPECT_EQ(c.find_service("echo")->authority, "10.0.0.1:80");
}

TEST(ConnectPolicy, AnswersLikeZtunnel) {
  ProxyConfig c;
  c.inbound.enabled = true;
  auto target = [](std::string authority, HostPort address, std::vector<std::string> allow,
                   std::vector<std::string> deny) {
    InboundTargetConfig t;
    t.authority = std::move(authority);
    t.address = std::move(address);
    t.allow = std::move(allow);
    t.deny = std::move(deny);
    return t;
  };
  c.inbound.targets.push_back(target("127.0.0.1:80", {"127.0.0.1", 80}, {"spiffe://td/ns/a/sa/ok"},
                                     {"spiffe://td/ns/a/sa/bad"}));
  c.inbound.targets.push_back(target("open:1", {"127.0.0.1", 1}, {}, {"spiffe://td/ns/a/sa/bad"}));
  EXPECT_EQ(authorize_connect(c, "td", "127.0.0.1:80", "spiffe://td/ns/a/sa/ok").status, 0);
  EXPECT_EQ(authorize_connect(c, "td", "127.0.0.1:81", "spiffe://td/ns/a/sa/ok").status, 400);
  EXPECT_EQ(authorize_connect(c, "td", "127.0.0.1:80", "spiffe://td/ns/a/sa/other").status, 401);
  EXPECT_EQ(authorize_connect(c, "td", "127.0.0.1:80", "spiffe://td/ns/a/sa/bad").status, 401);
  EXPECT_EQ(authorize_connect(c, "td", "open:1", "spiffe://td/ns/a/sa/anyone").status, 0);
  EXPECT_EQ(authorize_connect(c, "td", "open:1", "spiffe://td/ns/a/sa/bad").status, 401);
  EXPECT_EQ(authorize_connect(c, "td", "open:1", "spiffe://evil/ns/a/sa/anyone").status, 401);
}

}  // namespace
}  // namespace weft

namespace weft {
namespace {

TEST(IdentityPattern, NodeIdsPrefixesAndWildcard) {
  EXPECT_TRUE(check_mesh_identity("spiffe://mesh.test/cluster/east/node/ab12").ok());
  EXPECT_TRUE(check_mesh_identity("spiffe://mesh.test/ns/shop/sa/cart").ok());
  EXPECT_FALSE(check_mesh_identity("spiffe://mesh.test/cluster/east/node/").ok());
  EXPECT_FALSE(check_mesh_identity("spiffe://mesh.test/cluster//node/x").ok());
  EXPECT_FALSE(check_mesh_identity("spiffe://mesh.test/cluster/east/*").ok());
  EXPECT_TRUE(check_identity_pattern("spiffe://mesh.test/cluster/east/*").ok());
  EXPECT_TRUE(check_identity_pattern("*").ok());
  EXPECT_FALSE(check_identity_pattern("alice").ok());
  EXPECT_FALSE(check_identity_pattern("spiffe://UPPER/*").ok());
  EXPECT_TRUE(
      spiffe_pattern_matches("spiffe://t/cluster/east/*", "spiffe://t/cluster/east/node/1"));
  EXPECT_FALSE(
      spiffe_pattern_matches("spiffe://t/cluster/east/*", "spiffe://t/cluster/eastern/node/1"));
  EXPECT_FALSE(spiffe_pattern_matches("spiffe://t/ns/a/sa/b", "spiffe://t/ns/a/sa/bb"));
  EXPECT_TRUE(spiffe_pattern_matches("*", "spiffe://t/ns/a/sa/b"));
}

}  // namespace
}  // namespace weft
