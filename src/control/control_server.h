// `weft control`: join keys, agent registration (stable ID, mesh IP block, node certificate
// signed by the mesh CA), and the registry API over HTTPS. One thread; state lives in the store.
#pragma once

#include <atomic>
#include <filesystem>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include "control/registry.h"
#include "control/store.h"
#include "core/duration.h"
#include "core/host_port.h"
#include "http/http_server.h"
#include "identity/csr.h"
#include "p2p/relay_server.h"
#include "p2p/stun_server.h"

namespace weft {

struct ControlOptions {
  std::filesystem::path data_dir = "weft-control";
  std::filesystem::path ca_dir;  // ca.crt + ca.key: a `weft ca init` root or a plug-in intermediate
  HostPort listen{"0.0.0.0", 8443};
  bool insecure_http = false;
  std::string mesh_cidr = "100.64.0.0/10";
  Millis node_cert_ttl = std::chrono::hours(24);
  Millis workload_cert_ttl = std::chrono::hours(24);
  // After an HMAC secret rotation, signers keep the previous key this long, so every verifier
  // (refreshing every --hmac-refresh, 30 s by default) holds the new key before it is used.
  Millis hmac_rotation_grace = std::chrono::seconds(90);
  size_t change_log_size = 10000;
  Millis heartbeat_interval = std::chrono::seconds(10);  // 3 missed: unhealthy
  std::filesystem::path address_file;  // if set, the bound host:port is written here
  std::optional<HostPort> stun_listen = HostPort{"0.0.0.0", 3478};   // nullopt: no STUN
  std::optional<HostPort> relay_listen = HostPort{"0.0.0.0", 8444};  // nullopt: no relay
  std::vector<HostPort> relays;  // standalone `weft relay`s announced to agents, after our own
};

class ControlServer {
 public:
  explicit ControlServer(ControlOptions options);  // throws std::runtime_error
  ~ControlServer();
  int run();

  // The operator token (admin.token in the data dir, 0600) that guards the registry API.
  static std::string load_or_create_admin_token(const std::filesystem::path& data_dir);

 private:
  // A parked long poll, answered at the first change in its agent's scope or at its deadline;
  // or a chunked stream (?stream=true), written a line per change and an empty delta each
  // interval, which lives until the client goes away.
  struct Watcher {
    std::string agent_id;
    int64_t since = 0;
    HttpServer::Reply reply;
    std::unique_ptr<boost::asio::steady_timer> deadline;
    std::shared_ptr<ResponseStream> stream;
    Millis interval{0};
    // Dies with the watcher. A deadline that already fired is not undone by cancel(): its
    // queued handler checks this before touching the (maybe erased) list entry.
    std::shared_ptr<char> alive = std::make_shared<char>();
  };

  void dispatch(const HttpRequest& r, HttpServer::Reply reply);
  HttpResponse handle(const HttpRequest& r);
  void handle_watch(const HttpRequest& r, HttpServer::Reply reply);
  HttpResponse handle_registry(const HttpRequest& r, const std::string& kind,
                               const std::string& name);
  HttpResponse handle_workload_certificate(const HttpRequest& r);
  // HMAC request-signing key of a (source, destination) workload pair, for a node hosting one.
  HttpResponse handle_hmac_key(const HttpRequest& r);
  HttpResponse rotate_hmac_secret();  // POST /v1/hmac-keys/rotate (operator token)
  HttpResponse handle_register(const HttpRequest& r);
  HttpResponse handle_agents();
  HttpResponse handle_heartbeat(const HttpRequest& r);
  HttpResponse handle_create_key(const HttpRequest& r);
  bool is_operator(const HttpRequest& r) const;
  std::string node_id(const HttpRequest& r) const;  // from the node certificate, or ""
  // Stores a change, applies it to the registry and wakes the watchers it concerns.
  int64_t commit(const std::string& kind, const std::string& name, const std::string& body);
  void notify_watchers();
  void finish(std::list<Watcher>::iterator it, const WatchDelta& delta);
  void arm_watch_deadline(std::list<Watcher>::iterator it);
  // What an agent reports about itself; empty fields keep what was published before.
  struct AgentReport {
    std::string hbone, api;
    std::optional<boost::json::array> candidates;  // UDP addresses peers may try (local, reflexive)
    std::string nat_mapping;  // "endpoint-independent", "endpoint-dependent" or "unknown"
    std::optional<bool> p2p;  // runs a QUIC endpoint
    int64_t cert_expires_ms = 0;
  };
  void publish_agent(const AgentRecord& a, const AgentReport& report);
  void sweep_health();
  void probe_loop();

  ControlOptions options_;
  MeshPool pool_;
  std::unique_ptr<ControlStore> store_;
  SigningCa ca_;
  std::string admin_token_;
  std::string hmac_master_;      // <data-dir>/hmac.secret: pair keys derive from it
  std::string hmac_previous_;    // the secret before the last rotation (its keys still verify)
  int64_t hmac_rotated_at_ = 0;  // unix seconds of the last rotation (third line of the file)
  boost::asio::io_context io_;
  boost::asio::signal_set signals_;
  std::unique_ptr<HttpServer> http_;
  std::unique_ptr<StunServer> stun_;
  std::unique_ptr<RelayServer> relay_;
  std::set<relay::NodeKey> member_keys_;  // registered agents' node keys, for the relays
  uint64_t members_version_ = 1;          // changes with member_keys_ (standalone relays poll)
  struct LiveRelay {
    HostPort address;
    int64_t first_seen = 0, last_seen = 0;  // ms; the earliest is preferred
  };
  std::map<std::string, LiveRelay> live_relays_;  // standalone relays that called in
  // --relay ones, then those that called in lately, oldest first.
  std::vector<HostPort> standalone_relays();
  HttpResponse handle_relay_heartbeat(const HttpRequest& r);
  Registry registry_;
  std::list<Watcher> watchers_;
  boost::asio::steady_timer health_timer_;
  // Health, in memory: heartbeats and probe results; transitions are published as changes.
  std::map<std::string, int64_t> last_seen_;
  std::map<std::string, int> probe_failures_;
  std::set<std::string> probe_reached_;  // agents whose /health answered at least once
  std::mutex probe_mutex_;
  std::map<std::string, std::string> probe_targets_;  // agent id -> its API URL
  std::thread prober_;
  std::atomic<bool> stopping_{false};
};

}  // namespace weft
