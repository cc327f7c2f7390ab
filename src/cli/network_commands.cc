#include "cli/network_commands.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/json.hpp>
#include <iostream>
#include <stdexcept>

#include "core/duration.h"
#include "core/host_port.h"
#include "p2p/stun_client.h"

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;

namespace {

udp::endpoint resolve(asio::io_context& io, const std::string& text, bool allow_zero) {
  auto hp = parse_host_port(text, allow_zero);
  if (!hp) throw std::runtime_error("'" + text + "': " + hp.error());
  udp::resolver resolver(io);
  boost::system::error_code ec;
  auto results = resolver.resolve(udp::v4(), hp->host, std::to_string(hp->port), ec);
  if (ec || results.empty()) throw std::runtime_error("cannot resolve " + hp->host);
  return *results.begin();
}

std::string text(const udp::endpoint& ep) {
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

}  // namespace

int cmd_stun(const std::vector<std::string>& servers, const std::string& bind,
             const std::string& timeout, bool json_output) {
  asio::io_context io;
  std::vector<udp::endpoint> targets;
  for (const auto& s : servers) targets.push_back(resolve(io, s, false));
  auto wait = parse_duration(timeout);
  if (!wait) throw std::runtime_error("--timeout: " + wait.error());
  auto r = probe_nat(targets, resolve(io, bind, true), *wait);
  if (!r) throw std::runtime_error(r.error());
  if (json_output) {
    boost::json::object o{{"local", text(r->local)},
                          {"reflexive", text(r->reflexive)},
                          {"behind_nat", r->behind_nat()},
                          {"mapping", r->mapping()},
                          {"server_software", r->server_software}};
    if (r->second_server) o["second_server"] = text(*r->second_server);
    if (r->second_reflexive) o["second_reflexive"] = text(*r->second_reflexive);
    std::cout << boost::json::serialize(o) << "\n";
    return 0;
  }
  std::cout << "local       " << text(r->local) << "\n"
            << "reflexive   " << text(r->reflexive) << (r->behind_nat() ? "  (behind NAT)" : "")
            << "\n"
            << "mapping     " << r->mapping();
  if (r->second_server)
    std::cout << "  (" << text(*r->second_server) << " saw "
              << (r->second_reflexive ? text(*r->second_reflexive) : std::string("no answer"))
              << ")";
  std::cout << "\n"
            << "server      " << (r->server_software.empty() ? "-" : r->server_software) << "\n";
  return 0;
}

}  // namespace weft
