// One SO_REUSEPORT listening socket on one worker. Every worker binds its own socket on the same
// address, so the kernel spreads connections across workers and a connection never moves.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <boost/asio/ip/tcp.hpp>

#include "core/host_port.h"
#include "core/result.h"

namespace weft {

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  using Handler = std::function<void(boost::asio::ip::tcp::socket)>;

  // Binds now (on the caller's thread), so errors surface before the worker takes over.
  static Result<std::shared_ptr<Listener>> bind(boost::asio::io_context& io, std::string name,
                                                const HostPort& address);

  // Must run on the worker's thread.
  void start(Handler handler);
  void close();

  const std::string& name() const { return name_; }
  uint16_t port() const { return port_; }

 private:
  Listener(boost::asio::io_context& io, std::string name);
  void accept();

  boost::asio::ip::tcp::acceptor acceptor_;
  std::string name_;
  uint16_t port_ = 0;
  Handler handler_;
};

}  // namespace weft
