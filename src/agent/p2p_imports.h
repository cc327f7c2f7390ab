// Imports that the agent serves itself, straight over P2P QUIC.
//
// An import whose hosting agents are all reached over P2P is not rendered into the data plane
// proxy. The agent listens on its port, and each connection becomes one QUIC stream to a
// hosting agent, addressed to the export's authority; that agent checks the export's policy
// against the QUIC peer's node identity and connects the stream to the resource
// (`authorize_export`). Through the proxy the same connection carried HBONE — a second TLS
// session inside QUIC — between two proxies that both present the node certificates QUIC had
// already authenticated, so it cost a second encryption on each side and two more hops for no
// identity the QUIC handshake had not proven (docs/p2p-protocol.md, "Imports").
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>

#include "agent/mesh_view.h"
#include "core/host_port.h"
#include "p2p/p2p_endpoint.h"
#include "proxy/listener/listener.h"
#include "stats/access_log.h"
#include "stats/metrics.h"
#include "transport/quic/quic_tunnel.h"

namespace weft {

struct P2pImportPeer {
  relay::NodeKey key{};
  std::string name;       // for logs
  std::string spiffe_id;  // its node identity (the metrics' destination principal)
};

struct P2pImport {
  std::string service;
  HostPort listen;
  std::string authority;  // the export's, as the hosting agents know it
  std::vector<P2pImportPeer> peers;
};

class P2pImports {
 public:
  // `access_log` must outlive `p2p`: tunnels still open are logged as the endpoint closes them.
  P2pImports(boost::asio::io_context& io, P2pEndpoint& p2p, Metrics& metrics, AccessLog& access_log,
             std::string own_spiffe_id);
  ~P2pImports();

  // Serves exactly these imports: new ones start listening, changed ones take their new peers
  // at once (open tunnels keep going), gone ones stop listening. Returns the services it could
  // not listen for, with why.
  std::map<std::string, std::string> set(const std::vector<P2pImport>& imports);
  void close_all();
  boost::json::array status() const;

 private:
  struct Served {
    P2pImport import;
    std::shared_ptr<Listener> listener;
    size_t next_peer = 0;
    uint64_t opened = 0, failed = 0;
  };
  void on_connection(const std::string& service, boost::asio::ip::tcp::socket socket);

  boost::asio::io_context& io_;
  P2pEndpoint& p2p_;
  Metrics& metrics_;
  AccessLog& access_log_;
  std::string own_spiffe_id_;
  std::map<std::string, std::shared_ptr<Served>> served_;  // by service
};

// The hosting side: what a P2P tunnel to `authority` may reach among this agent's exports.
// nullopt if `authority` names no export (the caller answers it otherwise); else 401 when the
// export's policy does not admit `peer` (a node SPIFFE ID of `trust_domain`), or 200 with the
// resource as the target.
std::optional<quic::TunnelVerdict> authorize_export(const std::vector<MeshExport>& exports,
                                                    const std::string& trust_domain,
                                                    const std::string& peer,
                                                    const std::string& authority);

}  // namespace weft
