#include "proxy/admin/admin_server.h"

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

class AdminSession : public std::enable_shared_from_this<AdminSession> {
 public:
  AdminSession(tcp::socket socket, AdminServer::Handler& handler)
      : stream_(std::move(socket)), handler_(handler) {}

  void start() { read(); }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(64 * 1024);
    stream_.expires_after(std::chrono::seconds(30));
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (ec) return self->close();
                       self->respond();
                     });
  }

  void respond() {
    const auto& req = parser_->get();
    std::string target(req.target());
    AdminRequest r{std::string(req.method_string()), target.substr(0, target.find('?'))};
    AdminResponse out = handler_(r);
    res_ = {};
    res_.version(req.version());
    res_.result(static_cast<http::status>(out.status));
    res_.set(http::field::server, "weft");
    res_.set(http::field::content_type, out.content_type);
    res_.keep_alive(req.keep_alive());
    res_.body() = std::move(out.body);
    res_.prepare_payload();
    http::async_write(stream_, res_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec || !self->res_.keep_alive()) return self->close();
      self->read();
    });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
  }

  beast::tcp_stream stream_;
  AdminServer::Handler& handler_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
};

}  // namespace

AdminServer::AdminServer(asio::io_context& io, Handler handler)
    : acceptor_(io), handler_(std::move(handler)) {}

Result<std::unique_ptr<AdminServer>> AdminServer::bind(asio::io_context& io,
                                                       const HostPort& address, Handler handler) {
  std::unique_ptr<AdminServer> s(new AdminServer(io, std::move(handler)));
  boost::system::error_code ec;
  const auto ip =
      asio::ip::make_address(address.host == "localhost" ? "127.0.0.1" : address.host, ec);
  if (ec) return make_error("admin: " + address.host + " is not an IP address");
  const tcp::endpoint ep(ip, address.port);
  s->acceptor_.open(ep.protocol(), ec);
  if (!ec) s->acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) s->acceptor_.bind(ep, ec);
  if (!ec) s->acceptor_.listen(128, ec);
  if (ec)
    return make_error("admin cannot listen on " + address.to_string() + ": " + ec.message() +
                      " (set admin.listen to a free port, or 127.0.0.1:0)");
  s->port_ = s->acceptor_.local_endpoint().port();
  s->accept();
  return s;
}

void AdminServer::close() {
  boost::system::error_code ignored;
  acceptor_.close(ignored);
}

void AdminServer::accept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, tcp::socket socket) {
    if (!acceptor_.is_open()) return;
    if (!ec) std::make_shared<AdminSession>(std::move(socket), handler_)->start();
    accept();
  });
}

}  // namespace weft
