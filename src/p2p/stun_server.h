// Answers STUN Binding requests on UDP (control embeds it; the relay will too). It listens on
// two ports so a client can tell whether its NAT maps per destination: each answer names the
// other port as OTHER-ADDRESS (RFC 5780). Anything that is not a valid Binding request is
// dropped and counted; a datagram never gets more bytes back than a request's worth.
#pragma once

#include <atomic>
#include <memory>
#include <optional>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>

#include "core/host_port.h"
#include "core/result.h"

namespace weft {

class StunServer {
 public:
  // `listen` port 0 picks a port; the second socket takes the next port up (or any, with 0).
  static Result<std::unique_ptr<StunServer>> bind(boost::asio::io_context& io,
                                                  const HostPort& listen);
  ~StunServer();
  uint16_t port() const;
  uint16_t alternate_port() const;
  uint64_t answered() const { return answered_.load(); }
  uint64_t dropped() const { return dropped_.load(); }
  void close();

 private:
  struct Socket;
  StunServer() = default;
  void receive(Socket& s);

  std::unique_ptr<Socket> primary_, alternate_;
  std::atomic<uint64_t> answered_{0}, dropped_{0};
};

}  // namespace weft
