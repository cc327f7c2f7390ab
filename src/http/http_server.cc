#include "http/http_server.h"

#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/json.hpp>

#include "transport/tls/tls_contexts.h"

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

HttpResponse json_error(int status, const std::string& message, const std::string& field) {
  boost::json::object o{{"error", message}};
  if (!field.empty()) o["field"] = field;
  return {status, boost::json::serialize(o) + "\n", "application/json"};
}

namespace {

template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  Session(Stream stream, HttpServer::AsyncHandler& handler)
      : stream_(std::move(stream)), handler_(handler) {}

  void start() {
    if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
      stream_.async_handshake(asio::ssl::stream_base::server,
                              [self = this->shared_from_this()](beast::error_code ec) {
                                if (!ec) self->read();
                              });
    } else {
      read();
    }
  }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(HttpServer::kMaxBody);
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(60));
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, size_t) {
                       if (ec == http::error::body_limit) {
                         return self->send(json_error(413, "request body over 1 MiB"), false);
                       }
                       if (ec == http::error::end_of_stream || ec)
                         return;  // bad HTTP or closed: drop it
                       self->respond();
                     });
  }

  void respond() {
    const auto& req = parser_->get();
    HttpRequest r;
    r.method = std::string(req.method_string());
    std::string target(req.target());
    const auto q = target.find('?');
    r.path = target.substr(0, q);
    if (q != std::string::npos) r.query = target.substr(q + 1);
    r.body = req.body();
    if (auto it = req.find(http::field::authorization); it != req.end())
      r.authorization = std::string(it->value());
    if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
      if (auto id = peer_spiffe_id(stream_.native_handle())) r.peer_spiffe_id = *id;
    }
    // The read timer would cut a long poll; the handler's own deadline bounds the wait.
    beast::get_lowest_layer(stream_).expires_never();
    handler_(r, [self = this->shared_from_this(), keep_alive = req.keep_alive()](HttpResponse out) {
      self->send(std::move(out), keep_alive);
    });
  }

  void send(HttpResponse out, bool keep_alive) {
    res_ = {};
    res_.version(11);
    res_.result(static_cast<http::status>(out.status));
    res_.set(http::field::server, "weft");
    res_.set(http::field::content_type, out.content_type);
    res_.keep_alive(keep_alive);
    res_.body() = std::move(out.body);
    res_.prepare_payload();
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
    http::async_write(stream_, res_,
                      [self = this->shared_from_this()](beast::error_code ec, size_t) {
                        if (ec) return;
                        if (!self->res_.keep_alive()) return self->linger();
                        self->read();
                      });
  }

  // Lingering close: the client may still be sending (a body we refused with 413). Closing at
  // once would reset the connection and could destroy our answer in the client's buffer, so
  // send FIN, then read and discard for a moment.
  void linger() {
    beast::error_code ignored;
    auto& tcp_layer = beast::get_lowest_layer(stream_);
    tcp_layer.socket().shutdown(tcp::socket::shutdown_send, ignored);
    tcp_layer.expires_after(std::chrono::seconds(2));
    tcp_layer.async_read_some(asio::buffer(discard_),
                              [self = this->shared_from_this()](beast::error_code ec, size_t) {
                                if (!ec) self->linger_more();
                              });
  }
  void linger_more() {
    beast::get_lowest_layer(stream_).async_read_some(
        asio::buffer(discard_), [self = this->shared_from_this()](beast::error_code ec, size_t) {
          if (!ec) self->linger_more();
        });
  }

  Stream stream_;
  std::array<char, 16384> discard_{};
  HttpServer::AsyncHandler& handler_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
};

}  // namespace

struct HttpServer::Impl {
  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> tls, AsyncHandler handler)
      : acceptor(io), tls(std::move(tls)), handler(std::move(handler)) {}

  void accept() {
    acceptor.async_accept([this](const boost::system::error_code& ec, tcp::socket socket) {
      if (!acceptor.is_open()) return;
      if (!ec) {
        if (tls)
          std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(
              beast::ssl_stream<beast::tcp_stream>(beast::tcp_stream(std::move(socket)), *tls),
              handler)
              ->start();
        else
          std::make_shared<Session<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)),
                                                       handler)
              ->start();
      }
      accept();
    });
  }

  tcp::acceptor acceptor;
  std::shared_ptr<asio::ssl::context> tls;
  AsyncHandler handler;
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpServer::~HttpServer() { close(); }

Result<std::unique_ptr<HttpServer>> HttpServer::bind(asio::io_context& io, const HostPort& address,
                                                     std::shared_ptr<asio::ssl::context> tls,
                                                     Handler handler) {
  return bind_async(
      io, address, std::move(tls),
      [handler = std::move(handler)](const HttpRequest& r, Reply reply) { reply(handler(r)); });
}

Result<std::unique_ptr<HttpServer>> HttpServer::bind_async(asio::io_context& io,
                                                           const HostPort& address,
                                                           std::shared_ptr<asio::ssl::context> tls,
                                                           AsyncHandler handler) {
  auto impl = std::make_unique<Impl>(io, std::move(tls), std::move(handler));
  boost::system::error_code ec;
  const auto ip =
      asio::ip::make_address(address.host == "localhost" ? "127.0.0.1" : address.host, ec);
  if (ec) return make_error(address.host + " is not an IP address");
  const tcp::endpoint ep(ip, address.port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(1024, ec);
  if (ec) return make_error("cannot listen on " + address.to_string() + ": " + ec.message());
  impl->accept();
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

uint16_t HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

void HttpServer::close() {
  boost::system::error_code ignored;
  if (impl_) impl_->acceptor.close(ignored);
}

}  // namespace weft
