#include "proxy/listener/listener.h"

#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <boost/asio/steady_timer.hpp>

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

Listener::Listener(asio::io_context& io, std::string name)
    : acceptor_(io), name_(std::move(name)) {}

Result<std::shared_ptr<Listener>> Listener::bind(asio::io_context& io, std::string name,
                                                 const HostPort& address) {
  std::shared_ptr<Listener> l(new Listener(io, std::move(name)));
  boost::system::error_code ec;
  const auto ip =
      asio::ip::make_address(address.host == "localhost" ? "127.0.0.1" : address.host, ec);
  if (ec)
    return make_error("listener '" + l->name_ + "': " + address.host + " is not an IP address");
  const tcp::endpoint ep(ip, address.port);
  l->acceptor_.open(ep.protocol(), ec);
  if (!ec) l->acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) {
    int one = 1;
    if (::setsockopt(l->acceptor_.native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
      ec = boost::system::error_code(errno, boost::system::system_category());
  }
  if (!ec) l->acceptor_.bind(ep, ec);
  if (!ec) l->acceptor_.listen(4096, ec);
  if (ec)
    return make_error("listener '" + l->name_ + "' cannot listen on " + address.to_string() + ": " +
                      ec.message() + " (is another process using the port?)");
  l->port_ = l->acceptor_.local_endpoint().port();
  return l;
}

void Listener::start(Handler handler) {
  handler_ = std::move(handler);
  accept();
}

void Listener::close() {
  boost::system::error_code ignored;
  acceptor_.close(ignored);
}

void Listener::accept() {
  acceptor_.async_accept(
      [self = shared_from_this()](const boost::system::error_code& ec, tcp::socket socket) {
        if (ec == asio::error::operation_aborted || !self->acceptor_.is_open()) return;
        if (ec) {
          // EMFILE and friends: log, keep listening; the next accept may succeed.
          spdlog::warn("listener '{}': accept failed: {}", self->name_, ec.message());
        } else {
          boost::system::error_code ignored;
          socket.set_option(tcp::no_delay(true), ignored);
          self->handler_(std::move(socket));
        }
        self->accept();
      });
}

}  // namespace weft
