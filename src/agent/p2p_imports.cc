#include "agent/p2p_imports.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "identity/spiffe_id.h"

namespace weft {

namespace json = boost::json;
using tcp = boost::asio::ip::tcp;

P2pImports::P2pImports(boost::asio::io_context& io, P2pEndpoint& p2p, Metrics& metrics,
                       AccessLog& access_log, std::string own_spiffe_id)
    : io_(io),
      p2p_(p2p),
      metrics_(metrics),
      access_log_(access_log),
      own_spiffe_id_(std::move(own_spiffe_id)) {}

P2pImports::~P2pImports() { close_all(); }

std::map<std::string, std::string> P2pImports::set(const std::vector<P2pImport>& imports) {
  std::map<std::string, std::string> failed;
  std::map<std::string, std::shared_ptr<Served>> next;
  for (const auto& imp : imports) {
    auto it = served_.find(imp.service);
    if (it != served_.end() && it->second->import.listen == imp.listen) {
      it->second->import = imp;  // new peers or authority: the next connection uses them
      next[imp.service] = it->second;
      served_.erase(it);
      continue;
    }
    // SO_REUSEPORT: while the data plane still holds this port (it served the import until
    // its reload), both accept, and each connection works on the path that took it.
    auto l = Listener::bind(io_, "import/" + imp.service, imp.listen);
    if (!l) {
      failed[imp.service] = l.error();
      continue;
    }
    auto served = std::make_shared<Served>();
    served->import = imp;
    served->listener = *l;
    served->listener->start(
        [this, service = imp.service](tcp::socket s) { on_connection(service, std::move(s)); });
    next[imp.service] = served;
    spdlog::info("agent: import {} on {} goes over P2P QUIC to {} agent(s)", imp.service,
                 imp.listen.to_string(), imp.peers.size());
  }
  for (auto& [service, served] : served_) {
    served->listener->close();  // open tunnels finish on their own
    spdlog::info("agent: import {} is no longer served over P2P", service);
  }
  served_ = std::move(next);
  return failed;
}

void P2pImports::close_all() {
  for (auto& [service, served] : served_) served->listener->close();
  served_.clear();
}

void P2pImports::on_connection(const std::string& service, tcp::socket socket) {
  auto it = served_.find(service);
  if (it == served_.end() || it->second->import.peers.empty()) return;
  auto served = it->second;
  // Round robin over the hosting agents; each is one QUIC connection, dialed on first use.
  const auto& peer = served->import.peers[served->next_peer++ % served->import.peers.size()];
  auto counters =
      metrics_.tcp(TcpLabels{"source", own_spiffe_id_, peer.spiffe_id, service, "mutual_tls"});
  ++counters->opened;
  ++served->opened;
  AccessLogEntry entry;
  entry.direction = "outbound";
  entry.listener = "import/" + service;
  boost::system::error_code ec;
  const auto remote = socket.remote_endpoint(ec);
  if (!ec) entry.downstream = remote.address().to_string() + ":" + std::to_string(remote.port());
  entry.peer_identity = peer.spiffe_id;
  entry.local_identity = own_spiffe_id_;
  entry.upstream = "p2p/" + peer.name;
  entry.authority = served->import.authority;
  p2p_.connect(peer.key, std::move(socket), served->import.authority,
               // Not `this`: tunnels still open end as the P2P endpoint closes, after us.
               [&log = access_log_, served, counters, entry = std::move(entry)](
                   const std::string& result, uint64_t from_client, uint64_t to_client) mutable {
                 counters->received_bytes += from_client;
                 counters->sent_bytes += to_client;
                 ++counters->closed;
                 if (result != "ok") ++served->failed;
                 entry.result = result;
                 entry.bytes_received = from_client;
                 entry.bytes_sent = to_client;
                 log.write(entry);
               });
}

json::array P2pImports::status() const {
  json::array out;
  for (const auto& [service, served] : served_) {
    json::array peers;
    for (const auto& p : served->import.peers) peers.push_back(json::value(p.name));
    out.push_back(json::object{{"service", service},
                               {"listen", served->import.listen.to_string()},
                               {"authority", served->import.authority},
                               {"peers", peers},
                               {"connections", served->opened},
                               {"failed", served->failed}});
  }
  return out;
}

std::optional<quic::TunnelVerdict> authorize_export(const std::vector<MeshExport>& exports,
                                                    const std::string& trust_domain,
                                                    const std::string& peer,
                                                    const std::string& authority) {
  auto e = std::find_if(exports.begin(), exports.end(),
                        [&](const MeshExport& x) { return x.authority == authority; });
  if (e == exports.end()) return std::nullopt;
  quic::TunnelVerdict v;
  auto td = spiffe_trust_domain(peer);
  if (!td || *td != trust_domain) {
    v.status = 401;
    v.reason = peer + " is not of trust domain " + trust_domain;
    return v;
  }
  const bool allowed = std::any_of(e->allow.begin(), e->allow.end(), [&](const std::string& p) {
    return spiffe_pattern_matches(p, peer);
  });
  if (!allowed) {
    v.status = 401;
    v.reason = "the policies of " + e->service + " do not allow " + peer;
    return v;
  }
  v.target = e->target;
  return v;
}

}  // namespace weft
