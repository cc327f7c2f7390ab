#include "http/http_client.h"

#include <sys/stat.h>

#include <map>
#include <mutex>

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

std::string file_stamp(const std::filesystem::path& p) {
  struct stat st {};
  if (p.empty() || ::stat(p.c_str(), &st) != 0) return p.string() + ":-;";
  return p.string() + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec) + ":" + std::to_string(st.st_size) + ";";
}

// TLS client contexts by file set and their mtimes: loading a CA bundle and key decodes PEM
// through OpenSSL 3's providers, which cost as much as the handshake when done per call. A
// renewed certificate changes the mtime, so it is picked up on the next call.
Result<std::shared_ptr<asio::ssl::context>> client_context(const HttpCall& call) {
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<asio::ssl::context>> cache;
  const std::string key =
      file_stamp(call.ca_file) + file_stamp(call.cert_file) + file_stamp(call.key_file);
  {
    std::lock_guard lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
  beast::error_code ec;
  ctx->load_verify_file(call.ca_file.string(), ec);
  if (ec) return make_error("cannot load CA bundle " + call.ca_file.string() + ": " + ec.message());
  ctx->set_verify_mode(asio::ssl::verify_peer);
  if (!call.cert_file.empty()) {
    ctx->use_certificate_chain_file(call.cert_file.string(), ec);
    if (!ec) ctx->use_private_key_file(call.key_file.string(), asio::ssl::context::pem, ec);
    if (ec)
      return make_error("cannot load client certificate " + call.cert_file.string() + ": " +
                        ec.message());
  }
  std::lock_guard lock(mutex);
  if (cache.size() > 16) cache.clear();  // old generations of rotated files
  cache[key] = ctx;
  return ctx;
}

template <class Stream>
asio::awaitable<Result<HttpCallResult>> exchange(Stream& stream, const HttpCall& call,
                                                 const std::string& host,
                                                 const std::string& target) {
  http::request<http::string_body> req{http::string_to_verb(call.method), target, 11};
  req.set(http::field::host, host);
  req.set(http::field::user_agent, "weft");
  if (!call.bearer.empty()) req.set(http::field::authorization, "Bearer " + call.bearer);
  if (!call.body.empty()) req.set(http::field::content_type, "application/json");
  req.body() = call.body;
  req.prepare_payload();
  beast::error_code ec;
  co_await http::async_write(stream, req, asio::redirect_error(asio::use_awaitable, ec));
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 << 20);
  co_await http::async_read(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
  if (ec)
    co_return make_error("reading the response from " + call.url + ": " +
                         (ec == beast::error::timeout ? std::string("timed out") : ec.message()));
  co_return HttpCallResult{static_cast<int>(parser.get().result_int()), parser.get().body()};
}

asio::awaitable<Result<HttpCallResult>> run_unix_call(const HttpCall& call, std::string host,
                                                      std::string target) {
  auto ex = co_await asio::this_coro::executor;
  beast::error_code ec;
  beast::basic_stream<asio::local::stream_protocol> stream(ex);
  stream.expires_after(call.timeout);
  co_await stream.async_connect(asio::local::stream_protocol::endpoint(call.unix_socket.string()),
                                asio::redirect_error(asio::use_awaitable, ec));
  if (ec)
    co_return make_error("cannot connect to unix socket " + call.unix_socket.string() + ": " +
                         ec.message());
  co_return co_await exchange(stream, call, host, target);
}

asio::awaitable<Result<HttpCallResult>> run_call(const HttpCall& call, std::string scheme,
                                                 std::string host, std::string port,
                                                 std::string target) {
  auto ex = co_await asio::this_coro::executor;
  beast::error_code ec;
  if (!call.unix_socket.empty()) co_return co_await run_unix_call(call, host, target);
  tcp::resolver resolver(ex);
  auto results =
      co_await resolver.async_resolve(host, port, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return make_error("cannot resolve " + host + ": " + ec.message());
  beast::tcp_stream tcp_stream(ex);
  // One deadline for the whole call (Beast's timeouts apply to asynchronous operations).
  tcp_stream.expires_after(call.timeout);
  co_await tcp_stream.async_connect(results, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return make_error("cannot connect to " + host + ":" + port + ": " + ec.message());
  if (scheme == "http") co_return co_await exchange(tcp_stream, call, host, target);

  if (call.ca_file.empty()) co_return make_error("https needs a CA bundle to verify " + call.url);
  auto ctx = client_context(call);
  if (!ctx) co_return make_error(ctx.error());
  beast::ssl_stream<beast::tcp_stream> tls(std::move(tcp_stream), **ctx);
  co_await tls.async_handshake(asio::ssl::stream_base::client,
                               asio::redirect_error(asio::use_awaitable, ec));
  if (ec)
    co_return make_error("TLS with " + host + ":" + port + " failed: " + ec.message() +
                         " (is the CA bundle the mesh CA that signed control's certificate?)");
  co_return co_await exchange(tls, call, host, target);
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
  std::optional<Result<HttpCallResult>> out;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> { out = co_await run_call(call, scheme, host, port, target); },
      [&out](std::exception_ptr e) {
        if (!e) return;
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& x) {
          out = make_error(std::string("HTTP call failed: ") + x.what());
        }
      });
  while (!out) {
    io.run_for(std::chrono::milliseconds(50));
    // Leaving destroys the io_context and, with it, the suspended call.
    if (call.cancel && call.cancel->load()) return make_error("cancelled (shutting down)");
    if (io.stopped() && !out)
      return make_error("HTTP call to " + call.url + " ended without an answer");
  }
  return std::move(*out);
}

}  // namespace weft
