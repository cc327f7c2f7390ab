// `weft agent`: the node's identity (Ed25519, kept in the state dir), registration with control,
// the mesh-agent REST API, and the resource proxies it serves. Everything runs on one thread;
// registration runs beside it and posts its result back.
#pragma once

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "agent/dataplane.h"
#include "agent/mesh_view.h"
#include "agent/nat_discovery.h"
#include "agent/p2p_imports.h"
#include "agent/resource.h"
#include "agent/sds_server.h"
#include "http/http_client.h"
#include "http/http_server.h"
#include "p2p/p2p_endpoint.h"
#include "p2p/relay_group.h"
#include "proxy/listener/listener.h"
#include "stats/access_log.h"
#include "stats/metrics.h"

namespace weft {

struct AgentOptions {
  std::string control_url;
  std::string auth_key;
  std::filesystem::path state_dir;
  std::string api_address = "127.0.0.1";
  uint16_t api_port = 8081;
  uint16_t quic_port = 51820;  // UDP: QUIC to peer agents, STUN and path probes; 0: any
  // Which peers are reached over P2P QUIC (relay first, then direct): "cross-cluster" (agents
  // of other clusters), "always", or "off" (HBONE over TCP to every peer).
  std::string p2p = "cross-cluster";
  // "auto" (relay first, then direct when hole punching works) or "relay-only".
  std::string p2p_paths = "auto";
  std::chrono::milliseconds quic_keepalive{15000};
  std::chrono::milliseconds quic_idle_timeout{60000};
  std::vector<Resource> proxies;
  std::vector<std::string> networks;
  std::vector<std::string> advertise_routes;
  std::string name;
  std::string cluster_id;
  std::filesystem::path control_ca;
  std::string api_token;
  std::string resource_address = "127.0.0.1";
  std::string access_log = "stdout";   // P2P tunnels the agent serves without its data plane
  std::filesystem::path address_file;  // if set, the API's host:port is written here
  std::chrono::milliseconds heartbeat_interval{10000};
  HostPort hbone_listen{"0.0.0.0", 15008};  // the data plane's HBONE inbound
  std::string advertise_address;            // how other agents reach it; default: listen host
  std::filesystem::path sds_socket;         // default <state>/sds.sock; "off" disables
  std::vector<int> sds_allow_uids;          // sidecar uids besides our own and root
};

class AgentServer {
 public:
  explicit AgentServer(AgentOptions options);  // throws std::runtime_error
  ~AgentServer();
  int run();

 private:
  struct Proxy {
    Resource resource;
    std::shared_ptr<Listener> listener;
    std::string error;
  };

  HttpResponse handle(const HttpRequest& r);
  HttpResponse add_resource(const HttpRequest& r);
  HttpResponse put_resource(const std::string& id, const HttpRequest& r);
  HttpResponse delete_resource(const std::string& id);
  HttpResponse toggle(const std::string& id);
  bool authorized(const HttpRequest& r) const;
  std::string open_proxy(Proxy& p);
  void close_proxy(Proxy& p);
  bool port_taken(uint16_t port, const std::string& except_id) const;
  void save_resources();
  void save_agent() const;
  boost::json::object agent_json() const;
  void register_loop();
  void heartbeat_loop();
  void watch_loop();
  // Asks control for a node certificate (first registration and renewals); blocking.
  Result<boost::json::object> register_once(const std::string& key_pem);
  void install_registration(const boost::json::object& v);
  void renew_if_due(const std::string& key_pem);
  bool publish_resources();  // local resources -> control; false: try again later
  void rebuild_dataplane();
  // Asks control's STUN server (its port is in the heartbeat answer) for our candidates.
  std::optional<NatCandidates> probe_nat_via_control(const std::string& heartbeat_answer);
  // Keeps connections to the relays a heartbeat answer lists, in its order (io thread).
  void use_relays(const std::vector<HostPort>& relays);
  void start_sds();
  void start_p2p();
  void load_p2p_tls();
  // Peers for the P2P endpoint; local gateways (one loopback port per P2P peer, which the data
  // plane dials instead of the peer's HBONE address) for the agents reached over P2P.
  std::map<std::string, HostPort> update_p2p(const std::vector<MeshAgent>& agents);
  void accept_gateway(const std::string& agent_id);
  quic::TunnelVerdict authorize_tunnel(const std::string& peer, const std::string& authority) const;
  PairKey fetch_pair_key(const std::string& source, const std::string& destination);
  SignedWorkload sign_workload(const std::string& ns, const std::string& sa,
                               const std::string& csr_pem) const;
  HttpCall control_call(const std::string& path, bool with_node_cert) const;
  // Sleeps until `until` or a resource change; true if woken by a change.
  bool wait_or_wake(std::chrono::steady_clock::time_point until);

  AgentOptions options_;
  boost::asio::io_context io_;
  boost::asio::signal_set signals_;
  Metrics metrics_;
  AccessLog access_log_;
  std::unique_ptr<HttpServer> api_;
  std::map<std::string, Proxy> proxies_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  // Identity and what control assigned (agent.json).
  std::string id_, public_key_pem_, public_key_b64_, assigned_ip_, spiffe_id_, registered_at_;
  std::vector<std::string> mesh_blocks_;
  uint16_t api_port_ = 0;
  std::string advertise_address_;
  std::string control_state_ = "not configured";
  std::string watch_state_ = "not started";
  std::thread registrar_, watcher_;
  std::atomic<bool> stopping_{false};
  std::atomic<std::time_t> cert_received_{0};

  MeshView view_;
  std::unique_ptr<DataPlane> dataplane_;
  std::unique_ptr<SdsServer> sds_;
  std::unique_ptr<RelayGroup> relay_;  // the relays a heartbeat answer lists (io thread)
  std::unique_ptr<P2pEndpoint> p2p_;   // io thread only
  bool p2p_started_ = false;           // set before the other threads start; read by them
  struct Gateway {
    std::shared_ptr<boost::asio::ip::tcp::acceptor> acceptor;
    relay::NodeKey key{};
    std::string name, authority;
    uint16_t port = 0;
  };
  std::map<std::string, Gateway> gateways_;  // by agent id
  std::unique_ptr<P2pImports> p2p_imports_;  // imports served over QUIC without the data plane
  std::vector<MeshExport> exports_;          // what peers' tunnels may reach (io thread)
  std::atomic<uint16_t> hbone_port_{0};      // the data plane's bound HBONE inbound
  std::string dataplane_summary_;

  // Resources as control should see them (id -> JSON), set on the io thread and published by
  // the heartbeat thread, which it wakes.
  std::mutex sync_mutex_;
  std::condition_variable sync_cv_;
  std::map<std::string, std::string> desired_resources_;
  bool sync_wanted_ = true;
};

}  // namespace weft
