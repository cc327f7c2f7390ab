// L7 pieces without processes: config errors, route matching, balancing, outlier detection,
// retry budget, token buckets and trace context.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "config/proxy_config.h"
#include "proxy/http/cluster.h"
#include "proxy/http/h2_downstream.h"
#include "proxy/http/hmac_signing.h"
#include "proxy/http/http_session.h"
#include "proxy/http/request_policy.h"
#include "proxy/http/router.h"

namespace weft {
namespace {

std::string with_service(const std::string& http_block, const std::string& routes,
                         int endpoints = 3) {
  std::string eps;
  for (int i = 0; i < endpoints; ++i)
    eps += "      - {address: '127.0.0.1:15008', authority: 'e" + std::to_string(i) + ":80'}\n";
  return "identity: {cert: c.pem, key: k.pem, ca: ca.pem}\n"
         "services:\n  - name: s\n    spiffe_ids: ['spiffe://td/ns/a/sa/b']\n    endpoints:\n" +
         eps + http_block +
         "outbound:\n  - name: web\n    listen: 127.0.0.1:0\n    protocol: http\n    routes:\n" +
         routes;
}

std::shared_ptr<const ProxyConfig> parse(const std::string& yaml) {
  return std::make_shared<const ProxyConfig>(parse_proxy_config(yaml, "t.yaml", "/"));
}

std::string config_error(const std::string& yaml) {
  try {
    parse_proxy_config(yaml, "t.yaml", "/");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(L7Config, Http2ServicesAndTargets) {
  auto cfg = parse(with_service("    http: {protocol: grpc}\n", "      - {service: s}\n") +
                   "inbound:\n  targets:\n"
                   "    - {address: '127.0.0.1:50051', protocol: grpc}\n"
                   "    - {address: '127.0.0.1:8080', protocol: http}\n");
  EXPECT_TRUE(cfg->services[0].http.h2);
  EXPECT_TRUE(cfg->inbound.targets[0].http && cfg->inbound.targets[0].app_h2);
  EXPECT_TRUE(cfg->inbound.targets[1].http && !cfg->inbound.targets[1].app_h2);
  // The inbound target's app is a one-endpoint service that speaks what the target says.
  auto rt = HttpRuntime::build(cfg, nullptr);
  EXPECT_TRUE(rt->cluster("inbound|127.0.0.1:50051")->service().http.h2);
  EXPECT_FALSE(rt->cluster("inbound|127.0.0.1:8080")->service().http.h2);
}

TEST(L7Config, GrpcRetryConditions) {
  auto cfg = parse(with_service(
      "    http: {protocol: grpc}\n",
      "      - {service: s, retries: {attempts: 2, on: [unavailable, resource-exhausted]}}\n"));
  const auto& p = cfg->outbound[0].routes[0].retries;
  EXPECT_EQ(p.on_grpc, (1u << 14) | (1u << 8));
  EXPECT_FALSE(p.on_connect_failure || p.on_reset || p.on_5xx);  // `on` lists them all
  EXPECT_NE(config_error(with_service("", "      - {service: s, retries: {on: [unavaliable]}}\n"))
                .find("'unavaliable' is no retry condition"),
            std::string::npos);
}

TEST(L7Config, ErrorsNameTheFieldAndWhatToWrite) {
  EXPECT_NE(
      config_error(with_service("", "      - {service: nope}\n")).find("no service named 'nope'"),
      std::string::npos);
  EXPECT_NE(config_error(with_service("", "      - {service: s, backends: [{service: s}]}\n"))
                .find("not both"),
            std::string::npos);
  EXPECT_NE(config_error(with_service("", "      - {service: s, match: {path: {prefix: x}}}\n"))
                .find("routes[0].match.path.prefix': a path starts with '/'"),
            std::string::npos);
  EXPECT_NE(config_error(with_service("    http: {hash_on: source}\n", "      - {service: s}\n"))
                .find("only with load_balancer: ring_hash"),
            std::string::npos);
  EXPECT_NE(config_error(with_service("", "      - {service: s, retries: {on: [timeout]}}\n"))
                .find("'timeout' is no retry condition"),
            std::string::npos);
  EXPECT_NE(
      config_error(with_service("", "      - {service: s, retries: {per_try_timeout: soon}}\n"))
          .find("retries.per_try_timeout"),
      std::string::npos);
  EXPECT_NE(config_error(with_service("    http: {protocol: h3}\n", "      - {service: s}\n"))
                .find("http.protocol': 'h3' is unknown; expected http1, http2 or grpc"),
            std::string::npos);
  EXPECT_NE(config_error(with_service("    http: {protocol: grpc, hmac: {from_agent: false}}\n",
                                      "      - {service: s}\n"))
                .find("give key_file (a 0600 file) or from_agent: true"),
            std::string::npos);
  EXPECT_NE(config_error(with_service("", "      - {service: s, match: {host: 'a.b:80'}}\n"))
                .find("without a port"),
            std::string::npos);
  // routes need protocol: http
  EXPECT_NE(
      config_error("identity: {cert: c.pem, key: k.pem, ca: ca.pem}\nservices:\n  - {name: s, "
                   "addresses: ['127.0.0.1:1'], authority: 'a:1', spiffe_ids: "
                   "['spiffe://td/ns/a/sa/b']}\noutbound:\n  - {name: w, listen: "
                   "'127.0.0.1:0', service: s, routes: []}\n")
          .find("need protocol: http"),
      std::string::npos);
}

TEST(L7Routes, FirstMatchWinsOnHostPathMethodAndHeaders) {
  auto c = parse(
      with_service("",
                   "      - {name: r1, match: {host: '*.example.com', path: {regex: "
                   "'/v[0-9]+/.*'}}, service: s}\n"
                   "      - {name: r2, match: {path: {exact: /x}, method: POST}, service: s}\n"
                   "      - {name: r3, match: {headers: [{name: x-a, value: '1'}]}, service: s}\n"
                   "      - {name: r4, match: {path: {prefix: /p}}, service: s}\n"));
  const auto& routes = c->outbound[0].routes;
  std::map<std::string, std::string> headers;
  auto find = [&](std::string host, std::string path, std::string method) {
    RequestView v;
    v.host = host;
    v.path = path;
    v.method = method;
    v.ctx = &headers;
    v.header = [](const void* ctx, std::string_view n, std::string_view& out) {
      const auto& h = *static_cast<const std::map<std::string, std::string>*>(ctx);
      auto it = h.find(std::string(n));
      if (it == h.end()) return false;
      out = it->second;
      return true;
    };
    const RouteConfig* r = match_route(routes, v);
    return r ? r->name : std::string("none");
  };
  EXPECT_EQ(find("api.example.com", "/v2/users", "GET"), "r1");
  EXPECT_EQ(find("example.com", "/v2/users", "GET"), "none");  // *. needs a label before
  EXPECT_EQ(find("api.example.com", "/v2", "GET"), "none");
  EXPECT_EQ(find("h", "/x", "POST"), "r2");
  EXPECT_EQ(find("h", "/x", "GET"), "none");
  EXPECT_EQ(find("h", "/px", "GET"), "r4");
  headers["x-a"] = "1";
  EXPECT_EQ(find("h", "/px", "GET"), "r3");
  headers["x-a"] = "2";
  EXPECT_EQ(find("h", "/px", "GET"), "r4");
  // A path long enough to blow std::regex's recursion, against a pattern that backtracks
  // exponentially there: RE2 answers at once.
  auto hostile = parse(
      with_service("", "      - {name: slow, match: {path: {regex: '/(a*)*b'}}, service: s}\n"));
  EXPECT_EQ(match_route(hostile->outbound[0].routes,
                        RequestView{"h", std::string(1, '/') + std::string(64 * 1024, 'a'), "GET",
                                    nullptr, nullptr}),
            nullptr);
  EXPECT_NE(
      config_error(with_service("", "      - {service: s, match: {path: {regex: '/(?=x)'}}}\n"))
          .find("not a valid RE2 regular expression"),
      std::string::npos);
  EXPECT_EQ(normalize_host("API.Example.com:8443"), "api.example.com");
  EXPECT_EQ(normalize_host("[::1]:80"), "[::1]");
}

TEST(L7Balancing, RoundRobinAndWeightsAndRingHashStickiness) {
  auto c = parse(with_service("", "      - {service: s}\n"));
  auto rt = HttpRuntime::build(c, nullptr);
  const Cluster* cl = rt->cluster("s");
  ASSERT_NE(cl, nullptr);
  std::map<int, int> counts;
  for (int i = 0; i < 300; ++i) counts[cl->pick("", -1, 0, 1000)]++;
  EXPECT_EQ(counts[0], 100);
  EXPECT_EQ(counts[1], 100);
  EXPECT_EQ(counts[2], 100);
  EXPECT_NE(cl->pick("", 1, 0, 1000), 1);  // a retry avoids the endpoint that failed

  auto h = parse(with_service("    http: {load_balancer: ring_hash, hash_on: 'header:x-user'}\n",
                              "      - {service: s}\n"));
  auto hrt = HttpRuntime::build(h, nullptr);
  const Cluster* ring = hrt->cluster("s");
  std::set<int> used;
  for (int u = 0; u < 50; ++u) {
    const std::string key = "user-" + std::to_string(u);
    const int first = ring->pick(key, -1, 0, 1000);
    for (int k = 0; k < 5; ++k) EXPECT_EQ(ring->pick(key, -1, uint64_t(k) * 7919, 1000), first);
    used.insert(first);
  }
  EXPECT_EQ(used.size(), 3u);
  // Ejecting an endpoint moves only its keys; they come back when it returns.
  const int home = ring->pick("user-7", -1, 0, 1000);
  ring->endpoints()[home].state->ejected_until = 5000;
  EXPECT_NE(ring->pick("user-7", -1, 0, 1000), home);
  EXPECT_EQ(ring->pick("user-7", -1, 0, 6000), home);
}

TEST(L7Outliers, ConsecutiveFailuresEjectWithGrowingTimeAndACap) {
  auto c = parse(with_service(
      "    http:\n      outlier_detection: {consecutive_errors: 3, base_ejection: 10s, "
      "max_ejection_percent: 34}\n",
      "      - {service: s}\n"));
  auto rt = HttpRuntime::build(c, nullptr);
  const Cluster* cl = rt->cluster("s");
  auto& e0 = *cl->endpoints()[0].state;
  cl->record(0, true, 1000);
  cl->record(0, true, 1000);
  cl->record(0, false, 1000);  // a success resets the count
  cl->record(0, true, 1000);
  cl->record(0, true, 1000);
  EXPECT_EQ(e0.ejected_until.load(), 0);
  cl->record(0, true, 1000);
  EXPECT_EQ(e0.ejected_until.load(), 11000);
  for (int i = 0; i < 3; ++i) EXPECT_NE(cl->pick("", -1, 0, 2000), 0);
  // The second endpoint may not go too: 2 of 3 would be over 34%.
  for (int i = 0; i < 3; ++i) cl->record(1, true, 2000);
  EXPECT_EQ(cl->endpoints()[1].state->ejected_until.load(), 0);
  // Back after the ejection; the next ejection lasts twice as long.
  for (int i = 0; i < 4; ++i) EXPECT_NE(cl->pick("", 1, 0, 12000), 1) << i;
  for (int i = 0; i < 3; ++i) cl->record(0, true, 20000);
  EXPECT_EQ(e0.ejected_until.load(), 40000);
  // A reload keeps the state of endpoints that stay.
  auto rt2 = HttpRuntime::build(c, rt.get());
  EXPECT_EQ(rt2->cluster("s")->endpoints()[0].state->ejected_until.load(), 40000);
}

TEST(L7Budget, RetriesAreBoundedByTheBudget) {
  auto c = parse(
      with_service("    http: {retry_budget: {percent: 20, min: 2}}\n", "      - {service: s}\n"));
  auto rt = HttpRuntime::build(c, nullptr);
  const Cluster* cl = rt->cluster("s");
  auto& b = cl->breakers();
  b.requests = 100;
  b.retries = 19;
  EXPECT_TRUE(cl->retry_allowed());
  b.retries = 20;
  EXPECT_FALSE(cl->retry_allowed());
  b.requests = 1;
  b.retries = 1;
  EXPECT_TRUE(cl->retry_allowed());  // the minimum
  b.retries = 2;
  EXPECT_FALSE(cl->retry_allowed());
}

TEST(L7RateLimit, TokenBucketRefillsAtItsRate) {
  TokenBucket bucket(10, 3);
  EXPECT_TRUE(bucket.take(1000));
  EXPECT_TRUE(bucket.take(1000));
  EXPECT_TRUE(bucket.take(1000));
  EXPECT_FALSE(bucket.take(1000));
  EXPECT_FALSE(bucket.take(1050));  // half a token
  EXPECT_TRUE(bucket.take(1100));
  RateLimiter per_source({1, 1, true});
  EXPECT_TRUE(per_source.allow("10.0.0.1", 1000));
  EXPECT_FALSE(per_source.allow("10.0.0.1", 1000));
  EXPECT_TRUE(per_source.allow("10.0.0.2", 1000));
}

TEST(L7Trace, TraceparentIsKeptWhenValidAndStartedWhenNot) {
  std::string trace;
  const std::string in = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const std::string out = next_traceparent(in, 1, 2, 3, &trace);
  EXPECT_EQ(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(out.substr(0, 36), in.substr(0, 36));
  EXPECT_NE(out.substr(36, 16), in.substr(36, 16));
  for (const std::string bad :
       {"", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"}) {
    const std::string fresh = next_traceparent(bad, 0xabc, 0xdef, 0x123, &trace);
    EXPECT_EQ(fresh.size(), 55u) << bad;
    EXPECT_NE(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    EXPECT_EQ(fresh.substr(53), "01");
  }
}

}  // namespace
}  // namespace weft

namespace weft {
namespace {

TEST(L7Hmac, SignedRequestsVerifyOnceAndOnlyUnchangedAndFresh) {
  const std::string key = "0123456789abcdef0123456789abcdef";
  SignedRequest req{"POST",
                    "/api/pay?x=1",
                    "{\"amount\":5}",
                    {{"host", "pay:80"}, {"content-type", "application/json"}},
                    false};
  const std::string header = sign_request(key, req, 1700000000, "00112233445566778899aabbccddeeff");
  std::map<std::string, std::string> h{{"host", "pay:80"}, {"content-type", "application/json"}};
  auto lookup = [&](const std::string& n) { return h.count(n) ? h[n] : std::string(); };
  NonceCache nonces(std::chrono::seconds(600));
  const auto verify = [&](std::string_view method, std::string_view target, std::string_view body,
                          int64_t now, const std::string& hdr) {
    return verify_request(key, hdr, method, target, body, lookup, now, std::chrono::seconds(300),
                          nonces);
  };
  EXPECT_EQ(verify("POST", "/api/pay?x=1", "{\"amount\":5}", 1700000100, header), "");
  EXPECT_NE(verify("POST", "/api/pay?x=1", "{\"amount\":5}", 1700000100, header).find("replayed"),
            std::string::npos);
  const std::string h2 = sign_request(key, req, 1700000000, "ffeeddccbbaa99887766554433221100");
  EXPECT_NE(verify("POST", "/api/pay?x=1", "{\"amount\":500}", 1700000100, h2).find("tampered"),
            std::string::npos);
  EXPECT_NE(verify("GET", "/api/pay?x=1", "{\"amount\":5}", 1700000100, h2).find("tampered"),
            std::string::npos);
  h["host"] = "evil:80";
  EXPECT_NE(verify("POST", "/api/pay?x=1", "{\"amount\":5}", 1700000100, h2).find("tampered"),
            std::string::npos);
  h["host"] = "pay:80";
  EXPECT_NE(verify("POST", "/api/pay?x=1", "{\"amount\":5}", 1700000301, h2).find("stale"),
            std::string::npos);
  EXPECT_EQ(verify("POST", "/api/pay?x=1", "{\"amount\":5}", 1700000300, h2), "");  // 5 min is fine
  for (const char* bad : {"", "v2;ts=1", "v1;ts=1;nonce=zz;headers=host;sig=00",
                          "v1;ts=-1;nonce=00112233445566778899aabbccddeeff;headers=host;sig=00"})
    EXPECT_NE(verify("POST", "/", "", 1, bad), "") << bad;
}

// An HTTP/2 stream's body is signed apart, in chunks chained to the header's signature: the
// header verifies alone (before the body comes), each chunk only in its place after that
// header, and a body cut short, changed, reordered or moved to another request is refused
// before the changed chunk's bytes go anywhere.
TEST(L7Hmac, AStreamedBodyIsSignedInChunksChainedToTheHeader) {
  const std::string key = "0123456789abcdef0123456789abcdef";
  const SignedRequest head{"POST", "/echo.Echo/Unary", "", {{"host", "echo:50051"}}, true};
  const std::string header =
      sign_request(key, head, 1700000000, "00112233445566778899aabbccddeeff");
  EXPECT_NE(header.find(";body=chunks;sig="), std::string::npos) << header;
  auto lookup = [](const std::string& n) { return n == "host" ? std::string("echo:50051") : ""; };
  NonceCache nonces(std::chrono::seconds(600));
  const auto verify = [&](std::optional<std::string_view> body, const std::string& hdr) {
    return verify_request(key, hdr, "POST", "/echo.Echo/Unary", body, lookup, 1700000010,
                          std::chrono::seconds(300), nonces);
  };
  // As an HTTP/1.1 request (the whole body in hand) it is refused: no chunks can follow.
  EXPECT_NE(verify("hello", header).find("needs an HTTP/2 target"), std::string::npos);
  EXPECT_EQ(verify(std::nullopt, header), "");
  EXPECT_NE(verify(std::nullopt, header).find("replayed"), std::string::npos);

  const auto framed = [&](const std::string& hdr, std::initializer_list<std::string_view> parts) {
    ChunkSigner signer(key, hdr);
    std::string out;
    for (auto p : parts) signer.frame(p, out);
    signer.frame({}, out);
    return out;
  };
  const std::string wire = framed(header, {"hel", "lo"});
  {  // a whole body: chunks of kSignedChunk, then the last frame
    std::string whole;
    ChunkSigner(key, header).frame_whole(std::string(kSignedChunk + 1, 'x'), whole);
    EXPECT_EQ(whole.size(), 3 * kChunkHeaderSize + kSignedChunk + 1);
    ChunkVerifier v(key, header);
    std::string out;
    ASSERT_TRUE(v.feed(whole, out));
    EXPECT_TRUE(v.complete());
    EXPECT_EQ(out, std::string(kSignedChunk + 1, 'x'));
  }
  EXPECT_EQ(wire.size(), 3 * kChunkHeaderSize + 5);
  // Fed a byte at a time or all at once: the same payload, the headers used up.
  for (size_t step : {size_t{1}, size_t{7}, wire.size()}) {
    ChunkVerifier v(key, header);
    std::string out;
    size_t used = 0;
    for (size_t off = 0; off < wire.size(); off += step) {
      auto r = v.feed(std::string_view(wire).substr(off, step), out);
      ASSERT_TRUE(r) << r.error();
      used += *r;
      EXPECT_EQ(v.complete(), off + step >= wire.size());
    }
    EXPECT_EQ(out, "hello");
    EXPECT_EQ(used, 3 * kChunkHeaderSize);
  }
  const auto refused = [&](const std::string& bytes, std::string_view why) {
    ChunkVerifier v(key, header);
    std::string out;
    auto r = v.feed(bytes, out);
    if (r) return ::testing::AssertionFailure() << "accepted, gave '" << out << "'";
    if (r.error().find(why) == std::string::npos) return ::testing::AssertionFailure() << r.error();
    return ::testing::AssertionSuccess() << out;
  };
  std::string changed = wire;
  changed[kChunkHeaderSize + 3 + kChunkHeaderSize] ^= 1;  // "lo" -> "mo"
  EXPECT_TRUE(refused(changed, "does not match"));
  {  // the chunk before the change went on; the changed one did not
    ChunkVerifier v(key, header);
    std::string out;
    EXPECT_FALSE(v.feed(changed, out));
    EXPECT_EQ(out, "hel");
  }
  const size_t first = kChunkHeaderSize + 3, second = kChunkHeaderSize + 2;
  EXPECT_TRUE(
      refused(wire.substr(first, second) + wire.substr(0, first) + wire.substr(first + second),
              "does not match"));  // reordered
  // The same body signed under another header (chunks moved to another request).
  const std::string other = sign_request(key, head, 1700000000, "ffeeddccbbaa99887766554433221100");
  EXPECT_TRUE(refused(framed(other, {"hel", "lo"}), "does not match"));
  EXPECT_TRUE(refused(wire + wire.substr(0, kChunkHeaderSize), "after the last signed chunk"));
  std::string huge(4, '\xff');
  EXPECT_TRUE(refused(huge + std::string(64, 'a'), "at most"));
  {  // cut short: the last frame never came
    ChunkVerifier v(key, header);
    std::string out;
    ASSERT_TRUE(v.feed(std::string_view(wire).substr(0, 2 * kChunkHeaderSize + 5), out));
    EXPECT_EQ(out, "hello");
    EXPECT_FALSE(v.complete());
  }
  ChunkVerifier wrong_key("another key 0123456789abcdef0123", header);
  std::string ignored;
  EXPECT_FALSE(wrong_key.feed(wire, ignored));

  // Dropping body=chunks from the header (to skip the chunk checks) breaks the signature,
  // and a whole-body signature on a stream is refused.
  std::string stripped = other;
  stripped.erase(stripped.find(";body=chunks"), 12);
  EXPECT_NE(verify(std::nullopt, stripped).find("must come in signed chunks"), std::string::npos);
  EXPECT_NE(verify("", stripped).find("tampered"), std::string::npos);
  EXPECT_NE(verify("", other).find("without a body"), std::string::npos);
  EXPECT_FALSE(
      parse_signature("v1;ts=1;nonce=00112233445566778899aabbccddeeff;headers=host;"
                      "body=trailer;sig=" +
                      std::string(64, 'a')));
}

TEST(L7Hmac, TheNonceCacheForgetsOnlyOutsideTheWindowAndRefusesWhenFull) {
  NonceCache c(std::chrono::seconds(10), 3);
  EXPECT_TRUE(c.insert("a", 100));
  EXPECT_FALSE(c.insert("a", 105));
  EXPECT_TRUE(c.insert("b", 105));
  EXPECT_TRUE(c.insert("c", 105));
  EXPECT_FALSE(c.insert("d", 106));  // full of fresh nonces: refuse rather than forget one
  EXPECT_TRUE(c.insert("d", 112));   // "a" aged out
}

TEST(L7Http2, ThePrefaceIsToldFromHttp1ByItsFirstBytes) {
  EXPECT_EQ(match_h2_preface("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), PrefaceMatch::yes);
  EXPECT_EQ(match_h2_preface("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12"), PrefaceMatch::yes);
  EXPECT_EQ(match_h2_preface("PRI * HT"), PrefaceMatch::partial);
  EXPECT_EQ(match_h2_preface(""), PrefaceMatch::partial);  // nothing yet: wait for more
  EXPECT_EQ(match_h2_preface("GET / HTTP/1.1\r\n"), PrefaceMatch::no);
  EXPECT_EQ(match_h2_preface("PRIVATE / HTTP/1.1\r\n"), PrefaceMatch::no);
}

TEST(L7, GrpcTimeoutHeader) {
  EXPECT_EQ(parse_grpc_timeout("2S"), Millis(2000));
  EXPECT_EQ(parse_grpc_timeout("150m"), Millis(150));
  EXPECT_EQ(parse_grpc_timeout("1H"), Millis(3600000));
  EXPECT_EQ(parse_grpc_timeout("3M"), Millis(180000));
  EXPECT_EQ(parse_grpc_timeout("1500u"), Millis(2));  // rounded up: never shorter
  EXPECT_EQ(parse_grpc_timeout("1n"), Millis(1));
  EXPECT_EQ(parse_grpc_timeout("99999999H"), Millis(99999999LL * 3600000));
  for (const char* bad : {"", "S", "10", "10s", "-1S", "1.5S", "123456789S", " 1S"})
    EXPECT_FALSE(parse_grpc_timeout(bad)) << bad;
}

}  // namespace
}  // namespace weft
