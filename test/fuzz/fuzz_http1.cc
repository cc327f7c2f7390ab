#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <string_view>

#include "config/proxy_config.h"
#include "fuzz_targets.h"
#include "proxy/http/http_session.h"
#include "proxy/http/router.h"

// Hostile bytes on an L7 listener: the HTTP/1 parser (Beast, with our limits) either refuses
// them or yields a request; a request then goes through routing and trace-context handling,
// which must hold their invariants for any header values.
namespace {

const weft::ProxyConfig& config() {
  static const weft::ProxyConfig c = weft::parse_proxy_config(R"(
identity: {cert: c.pem, key: k.pem, ca: ca.pem}
services:
  - name: s
    spiffe_ids: ['spiffe://td/ns/a/sa/b']
    endpoints: [{address: '127.0.0.1:1', authority: 'x:80'}]
outbound:
  - name: web
    listen: 127.0.0.1:0
    protocol: http
    routes:
      - {match: {host: '*.example.com', path: {regex: '/a/[0-9]+'}}, service: s}
      - {match: {path: {exact: /x}, method: POST, headers: [{name: x-a, present: true}]}, service: s}
      - {match: {path: {prefix: /p}, headers: [{name: x-b, value: v}]}, service: s}
)",
                                                              "fuzz.yaml", "/");
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace http = boost::beast::http;
  http::request_parser<http::string_body> parser;
  parser.header_limit(64 * 1024);
  parser.body_limit(1024 * 1024);
  parser.eager(true);
  boost::system::error_code ec;
  size_t used = 0;
  while (used < size && !parser.is_done()) {
    const size_t n = parser.put(boost::asio::buffer(data + used, size - used), ec);
    if (ec == http::error::need_more) break;
    if (ec) return 0;
    if (n == 0) break;
    used += n;
  }
  if (!parser.is_header_done()) return 0;
  const auto& req = parser.get();
  const std::string host = weft::normalize_host(req[http::field::host]);
  for (char c : host)
    if (c >= 'A' && c <= 'Z') __builtin_trap();
  if (!host.empty() && host[0] != '[' && host.find(':') != std::string::npos) __builtin_trap();
  const std::string_view target = req.target();
  weft::RequestView view;
  view.host = host;
  view.path = target.substr(0, target.find('?'));
  view.method = req.method_string();
  view.ctx = &req;
  view.header = [](const void* ctx, std::string_view name, std::string_view& value) {
    const auto& r = *static_cast<const http::request<http::string_body>*>(ctx);
    auto it = r.find(name);
    if (it == r.end()) return false;
    value = it->value();
    return true;
  };
  const weft::RouteConfig* route = weft::match_route(config().outbound[0].routes, view);
  (void)route;
  std::string trace;
  const std::string tp = weft::next_traceparent(req["traceparent"], 1, 2, 3, &trace);
  if (tp.size() != 55 || trace.size() != 32 || tp.compare(3, 32, trace) != 0) __builtin_trap();
  return 0;
}
