#include "p2p/stun_client.h"

#include <poll.h>

#include <array>

#include "p2p/stun.h"

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;
using Clock = std::chrono::steady_clock;

std::string NatReport::mapping() const {
  if (!mapping_known()) return "unknown";
  return mapping_varies() ? "endpoint-dependent" : "endpoint-independent";
}

namespace {

// One Binding transaction on a blocking socket: send, wait with poll, resend on the RTO.
Result<stun::Message> transact(udp::socket& s, const udp::endpoint& server, Clock::time_point end,
                               Millis rto) {
  const auto id = stun::new_transaction_id();
  const auto request = stun::binding_request(id);
  std::array<uint8_t, 1500> buf{};
  std::string last_problem = "no answer";
  while (Clock::now() < end) {
    boost::system::error_code ec;
    s.send_to(asio::buffer(request), server, 0, ec);
    if (ec)
      return make_error("cannot send to " + server.address().to_string() + ": " + ec.message());
    const auto resend = std::min(end, Clock::now() + rto);
    while (Clock::now() < resend) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(resend - Clock::now());
      pollfd p{s.native_handle(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(std::max<int64_t>(1, left.count()))) <= 0) continue;
      udp::endpoint from;
      const size_t n = s.receive_from(asio::buffer(buf), from, 0, ec);
      if (ec) continue;  // e.g. ICMP port unreachable from an earlier send
      auto m = stun::parse(buf.data(), n);
      if (!m) {
        last_problem = "a bad answer: " + m.error();
        continue;
      }
      if (m->transaction != id) continue;  // a late answer to an earlier probe
      if (m->type == static_cast<uint16_t>(stun::MessageType::binding_error))
        return make_error("the server refused: error " + std::to_string(m->error_code));
      if (!m->reflexive()) return make_error("the answer has no mapped address");
      return std::move(*m);
    }
    rto *= 2;
  }
  return make_error(last_problem + " from " + server.address().to_string() + ":" +
                    std::to_string(server.port()) + " (is UDP blocked?)");
}

}  // namespace

Result<NatReport> probe_nat(const std::vector<udp::endpoint>& servers,
                            const udp::endpoint& local_bind, Millis timeout, Millis rto) {
  if (servers.empty()) return make_error("no STUN server given");
  asio::io_context io;
  udp::socket s(io);
  boost::system::error_code ec;
  s.open(servers.front().protocol(), ec);
  if (!ec) s.bind(local_bind, ec);
  if (ec) return make_error("cannot bind a UDP socket: " + ec.message());
  const auto end = Clock::now() + timeout;
  auto first = transact(s, servers.front(), end, rto);
  if (!first) return make_error("STUN " + first.error());
  NatReport r;
  r.local = s.local_endpoint();
  r.reflexive = *first->reflexive();
  r.server_software = first->software;
  // The second destination: another server, else the first one's other port.
  std::optional<udp::endpoint> second;
  if (servers.size() > 1)
    second = servers[1];
  else if (first->other_address)
    second = *first->other_address;
  if (second) {
    r.second_server = second;
    auto other = transact(s, *second, end, rto);
    if (other) r.second_reflexive = *other->reflexive();
  }
  return r;
}

}  // namespace weft
