// Capture plumbing that is not protocol parsing: the original destination of a REDIRECTed
// connection, peeking at a socket's first bytes without consuming them, and where a captured
// connection goes.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/asio/ip/tcp.hpp>

#include "config/proxy_config.h"
#include "core/host_port.h"
#include "core/result.h"

namespace weft {

// SO_ORIGINAL_DST (IPv4) / IP6T_SO_ORIGINAL_DST (IPv6): where the application was connecting
// before iptables REDIRECT sent it to us.
Result<boost::asio::ip::tcp::endpoint> original_destination(boost::asio::ip::tcp::socket& s);
// The same as host:port, refusing a connection dialled straight at the capture port: its
// "original destination" is the port itself, and forwarding it would loop.
Result<HostPort> redirected_destination(boost::asio::ip::tcp::socket& s);

// Peeks (MSG_PEEK: nothing is consumed) at what the client sent, calling `decide(bytes,
// final)` when bytes arrive and, with final = true, once at the deadline or end of stream; it
// returns true when it has what it needs. The first wait is for readability; after a partial
// answer it polls (1 ms, backing off to 32 ms), since a socket with unread bytes is always
// readable.
// Runs on the socket's executor; the socket must outlive the peek.
using PeekDecide = std::function<bool(std::string_view bytes, bool final)>;
void peek_until(boost::asio::ip::tcp::socket& s, std::chrono::milliseconds timeout, size_t max,
                PeekDecide decide);

// Reads and discards exactly n bytes the caller peeked before (they are already there).
bool consume(boost::asio::ip::tcp::socket& s, size_t n);

struct CaptureRoute {
  const ServiceConfig* service = nullptr;  // into the mesh
  std::optional<HostPort> egress;          // out of the mesh, to this address
  std::string denied;                      // neither: why
  std::string matched;                     // what matched: "sni reviews:443", "address ..."
};

// `name` is an SNI, Host or proxy request name (may be empty); `destination` the original
// destination (transparent) or the requested host:port (explicit). Names match first.
CaptureRoute route_captured(const ProxyConfig& config, std::string_view name,
                            const HostPort& destination);

// The client's address as host:port, or "" once it is gone.
std::string remote_of(const boost::asio::ip::tcp::socket& s);

// "host", "host:port", "[v6]:port" (a Host header) → host and port (`default_port` if none).
std::optional<HostPort> split_host_header(std::string_view host, uint16_t default_port);

}  // namespace weft
