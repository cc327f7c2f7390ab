#include "proxy/capture/capture.h"

#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstring>

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

Result<tcp::endpoint> original_destination(tcp::socket& s) {
  boost::system::error_code ec;
  const auto local = s.local_endpoint(ec);
  if (ec) return make_error("no local address: " + ec.message());
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  const int fd = s.native_handle();
  const bool v6 = local.address().is_v6() && !local.address().to_v6().is_v4_mapped();
  const int rc = v6 ? ::getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &ss, &len)
                    : ::getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &ss, &len);
  if (rc != 0)
    return make_error(std::string("no original destination (SO_ORIGINAL_DST: ") +
                      std::strerror(errno) + "); was the connection redirected by iptables?");
  if (ss.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
    asio::ip::address_v4::bytes_type b;
    std::memcpy(b.data(), &in->sin_addr, 4);
    return tcp::endpoint(asio::ip::address_v4(b), ntohs(in->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
    asio::ip::address_v6::bytes_type b;
    std::memcpy(b.data(), &in6->sin6_addr, 16);
    return tcp::endpoint(asio::ip::address_v6(b), ntohs(in6->sin6_port));
  }
  return make_error("original destination of unknown family " + std::to_string(ss.ss_family));
}

Result<HostPort> redirected_destination(tcp::socket& s) {
  auto dst = original_destination(s);
  if (!dst) return make_error(dst.error());
  boost::system::error_code ec;
  if (*dst == s.local_endpoint(ec))
    return make_error("it was dialled directly, not redirected here by iptables");
  return HostPort{dst->address().to_string(), dst->port()};
}

namespace {

struct PeekState : std::enable_shared_from_this<PeekState> {
  PeekState(tcp::socket& s, size_t max, PeekDecide decide)
      : socket(s),
        timer(s.get_executor()),
        deadline(s.get_executor()),
        max(max),
        decide(std::move(decide)),
        buffer(max) {}
  tcp::socket& socket;
  asio::steady_timer timer, deadline;
  size_t max;
  PeekDecide decide;
  std::vector<char> buffer;
  bool done = false;
  // A client that sent part of what we need is polled, 1 ms first, then less and less often:
  // one that trickles a byte and stalls must not cost a wakeup a millisecond until the deadline.
  std::chrono::milliseconds poll{1};

  void finish() {
    done = true;
    timer.cancel();
    deadline.cancel();
  }
  // Peeks what is there; returns false when the stream ended (or failed).
  bool peek(std::string_view& out) {
    const ssize_t n = ::recv(socket.native_handle(), buffer.data(), max, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
      out = std::string_view(buffer.data(), static_cast<size_t>(n));
      return true;
    }
    out = {};
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  void step() {
    if (done) return;
    std::string_view bytes;
    const bool open = peek(bytes);
    if (!open || bytes.size() >= max) {
      finish();
      decide(bytes, true);
      return;
    }
    if (!bytes.empty() && decide(bytes, false)) return finish();
    if (bytes.empty()) {
      socket.async_wait(tcp::socket::wait_read,
                        [self = shared_from_this()](const boost::system::error_code& ec) {
                          if (ec || self->done) return;
                          self->step();
                        });
    } else {
      timer.expires_after(poll);
      poll = std::min(poll * 2, std::chrono::milliseconds(32));
      timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
        if (!ec) self->step();
      });
    }
  }
};

}  // namespace

void peek_until(tcp::socket& s, std::chrono::milliseconds timeout, size_t max, PeekDecide decide) {
  auto st = std::make_shared<PeekState>(s, max, std::move(decide));
  st->deadline.expires_after(timeout);
  st->deadline.async_wait([st](const boost::system::error_code& ec) {
    if (ec || st->done) return;
    std::string_view bytes;
    st->peek(bytes);
    st->finish();
    // Cancels the pending readability wait; its handler sees `done` and returns.
    boost::system::error_code ignored;
    st->socket.cancel(ignored);
    st->decide(bytes, true);
  });
  st->step();
}

bool consume(tcp::socket& s, size_t n) {
  std::vector<char> sink(n);
  boost::system::error_code ec;
  // The bytes were peeked already: this read cannot block.
  asio::read(s, asio::buffer(sink), ec);
  return !ec;
}

std::string remote_of(const tcp::socket& s) {
  boost::system::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "";
  return HostPort{ep.address().to_string(), ep.port()}.to_string();
}

std::optional<HostPort> split_host_header(std::string_view host, uint16_t default_port) {
  if (host.empty()) return std::nullopt;
  std::string h(host);
  const bool bracketed = h.front() == '[';
  const size_t colon = h.rfind(':');
  const bool has_port = colon != std::string::npos && (!bracketed || colon > h.find(']'));
  auto hp = parse_host_port(has_port ? h : h + ":" + std::to_string(default_port));
  if (!hp) return std::nullopt;
  return *hp;
}

CaptureRoute route_captured(const ProxyConfig& config, std::string_view name,
                            const HostPort& destination) {
  CaptureRoute r;
  if (!name.empty()) {
    for (const auto& s : config.services)
      for (const auto& d : s.destinations)
        if (d.host == name && d.port == destination.port) {
          r.service = &s;
          r.matched = "name " + d.to_string();
          return r;
        }
  }
  for (const auto& s : config.services)
    for (const auto& d : s.destinations)
      if (d == destination) {
        r.service = &s;
        r.matched = "address " + d.to_string();
        return r;
      }
  if (config.capture.egress_allowed) {
    r.egress = destination;
    r.matched = "egress";
    return r;
  }
  r.denied = "egress_denied: " + destination.to_string() +
             " is no mesh service and capture.egress is deny";
  return r;
}

}  // namespace weft
