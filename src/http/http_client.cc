#include "http/http_client.h"

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/url/parse.hpp>

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

template <class Stream>
Result<HttpCallResult> exchange(Stream& stream, const HttpCall& call, const std::string& host,
                                const std::string& target) {
  http::request<http::string_body> req{http::string_to_verb(call.method), target, 11};
  req.set(http::field::host, host);
  req.set(http::field::user_agent, "weft");
  if (!call.bearer.empty()) req.set(http::field::authorization, "Bearer " + call.bearer);
  if (!call.body.empty()) req.set(http::field::content_type, "application/json");
  req.body() = call.body;
  req.prepare_payload();
  beast::error_code ec;
  http::write(stream, req, ec);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 << 20);
  http::read(stream, buffer, parser, ec);
  if (ec) return make_error("reading the response from " + call.url + ": " + ec.message());
  return HttpCallResult{static_cast<int>(parser.get().result_int()), parser.get().body()};
}

}  // namespace

Result<HttpCallResult> http_call(const HttpCall& call) {
  auto url = boost::urls::parse_uri(call.url);
  if (!url) return make_error("bad URL '" + call.url + "': expected http(s)://host:port/path");
  const std::string scheme(url->scheme());
  if (scheme != "http" && scheme != "https")
    return make_error("bad URL '" + call.url + "': use http or https");
  const std::string host(url->host());
  const std::string port =
      url->has_port() ? std::string(url->port()) : (scheme == "https" ? "443" : "80");
  std::string target(url->encoded_path());
  if (target.empty()) target = "/";
  if (url->has_query()) target += "?" + std::string(url->encoded_query());

  asio::io_context io;
  tcp::resolver resolver(io);
  beast::error_code ec;
  auto results = resolver.resolve(host, port, ec);
  if (ec) return make_error("cannot resolve " + host + ": " + ec.message());
  beast::tcp_stream tcp_stream(io);
  tcp_stream.expires_after(call.timeout);
  tcp_stream.connect(results, ec);
  if (ec) return make_error("cannot connect to " + host + ":" + port + ": " + ec.message());
  if (scheme == "http") return exchange(tcp_stream, call, host, target);

  asio::ssl::context ctx(asio::ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION);
  if (call.ca_file.empty()) return make_error("https needs a CA bundle to verify " + call.url);
  ctx.load_verify_file(call.ca_file.string(), ec);
  if (ec) return make_error("cannot load CA bundle " + call.ca_file.string() + ": " + ec.message());
  ctx.set_verify_mode(asio::ssl::verify_peer);
  if (!call.cert_file.empty()) {
    ctx.use_certificate_chain_file(call.cert_file.string(), ec);
    if (!ec) ctx.use_private_key_file(call.key_file.string(), asio::ssl::context::pem, ec);
    if (ec)
      return make_error("cannot load client certificate " + call.cert_file.string() + ": " +
                        ec.message());
  }
  beast::ssl_stream<beast::tcp_stream> tls(std::move(tcp_stream), ctx);
  tls.handshake(asio::ssl::stream_base::client, ec);
  if (ec)
    return make_error("TLS with " + host + ":" + port + " failed: " + ec.message() +
                      " (is the CA bundle the mesh CA that signed control's certificate?)");
  return exchange(tls, call, host, target);
}

}  // namespace weft
