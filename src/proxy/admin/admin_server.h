// The admin HTTP server (Boost.Beast), on its own thread and io_context so that a scrape or a
// config dump never adds latency to traffic. Binds loopback only (enforced by config).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "core/host_port.h"
#include "core/result.h"

namespace weft {

struct AdminRequest {
  std::string method;
  std::string path;
};

struct AdminResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};

class AdminServer {
 public:
  using Handler = std::function<AdminResponse(const AdminRequest&)>;

  static Result<std::unique_ptr<AdminServer>> bind(boost::asio::io_context& io,
                                                   const HostPort& address, Handler handler);
  uint16_t port() const { return port_; }
  void close();

 private:
  AdminServer(boost::asio::io_context& io, Handler handler);
  void accept();

  boost::asio::ip::tcp::acceptor acceptor_;
  Handler handler_;
  uint16_t port_ = 0;
};

}  // namespace weft
