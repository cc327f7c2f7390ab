#include "p2p/stun_server.h"

#include <spdlog/spdlog.h>

#include <array>

#include "p2p/stun.h"

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;

struct StunServer::Socket {
  explicit Socket(asio::io_context& io) : socket(io) {}
  udp::socket socket;
  udp::endpoint peer;
  udp::endpoint other;  // the other socket's address, for OTHER-ADDRESS
  std::array<uint8_t, 1500> buffer{};
};

namespace {

Result<bool> open_socket(udp::socket& s, const asio::ip::address& ip, uint16_t port) {
  boost::system::error_code ec;
  const udp::endpoint ep(ip, port);
  s.open(ep.protocol(), ec);
  if (!ec) s.bind(ep, ec);
  if (ec)
    return make_error("cannot listen on UDP " + ep.address().to_string() + ":" +
                      std::to_string(port) + ": " + ec.message());
  return true;
}

}  // namespace

Result<std::unique_ptr<StunServer>> StunServer::bind(asio::io_context& io, const HostPort& listen) {
  boost::system::error_code ec;
  const auto ip =
      asio::ip::make_address(listen.host == "localhost" ? "127.0.0.1" : listen.host, ec);
  if (ec) return make_error("STUN: " + listen.host + " is not an IP address");
  std::unique_ptr<StunServer> s(new StunServer());
  s->primary_ = std::make_unique<Socket>(io);
  s->alternate_ = std::make_unique<Socket>(io);
  if (auto ok = open_socket(s->primary_->socket, ip, listen.port); !ok)
    return make_error("STUN: " + ok.error());
  const uint16_t first = s->primary_->socket.local_endpoint().port();
  // The next port when it is free (what operators expect from 3478/3479), else any.
  if (auto ok = open_socket(s->alternate_->socket, ip, listen.port ? first + 1 : 0); !ok) {
    s->alternate_->socket.close();
    if (auto any = open_socket(s->alternate_->socket, ip, 0); !any)
      return make_error("STUN: " + any.error());
  }
  s->primary_->other = s->alternate_->socket.local_endpoint();
  s->alternate_->other = s->primary_->socket.local_endpoint();
  // Clients need an address they can send to: a wildcard listener names its own as loopback.
  for (Socket* sock : {s->primary_.get(), s->alternate_.get()})
    if (sock->other.address().is_unspecified())
      sock->other.address(ip.is_v4() ? asio::ip::address(asio::ip::address_v4::loopback())
                                     : asio::ip::address(asio::ip::address_v6::loopback()));
  s->receive(*s->primary_);
  s->receive(*s->alternate_);
  return s;
}

StunServer::~StunServer() { close(); }

uint16_t StunServer::port() const {
  boost::system::error_code ec;
  return primary_->socket.local_endpoint(ec).port();
}

uint16_t StunServer::alternate_port() const {
  boost::system::error_code ec;
  return alternate_->socket.local_endpoint(ec).port();
}

void StunServer::close() {
  boost::system::error_code ignored;
  if (primary_) primary_->socket.close(ignored);
  if (alternate_) alternate_->socket.close(ignored);
}

void StunServer::receive(Socket& s) {
  s.socket.async_receive_from(
      asio::buffer(s.buffer), s.peer, [this, &s](const boost::system::error_code& ec, size_t n) {
        if (ec == asio::error::operation_aborted || !s.socket.is_open()) return;
        if (!ec) {
          auto m = stun::parse(s.buffer.data(), n);
          if (m && m->type == static_cast<uint16_t>(stun::MessageType::binding_request)) {
            boost::system::error_code local_ec;
            const auto origin = s.socket.local_endpoint(local_ec);
            const auto answer = stun::binding_success(
                m->transaction, s.peer, s.other, local_ec ? std::nullopt : std::optional(origin));
            boost::system::error_code send_ec;
            s.socket.send_to(asio::buffer(answer), s.peer, 0, send_ec);  // UDP: never blocks long
            ++answered_;
          } else {
            ++dropped_;
            spdlog::debug("stun: dropped {} bytes from {}: {}", n, s.peer.address().to_string(),
                          m ? "not a Binding request" : m.error());
          }
        }
        receive(s);
      });
}

}  // namespace weft
