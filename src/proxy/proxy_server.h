// `weft proxy`: owns the workers, the listeners' lifecycle, the admin server and the signals.
// Runs on the main thread (the "admin thread"): reloads, certificate checks and drain happen
// here and reach workers only as posted snapshots and listener changes.
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include "http/http_server.h"
#include "proxy/snapshot.h"
#include "proxy/worker.h"
#include "stats/access_log.h"
#include "stats/metrics.h"

namespace weft {

struct ProxyOptions {
  std::filesystem::path config_file;
  std::filesystem::path admin_address_path;  // if set, "host:port" of admin is written here
  // How often HMAC keys that come from the agent are fetched again (control may rotate them).
  std::chrono::milliseconds hmac_refresh{30000};
};

class ProxyServer {
 public:
  // Throws ConfigError (bad config) or std::runtime_error (cannot bind, bad certificates):
  // a proxy that cannot do all it is configured to do does not start.
  explicit ProxyServer(ProxyOptions options);
  ~ProxyServer();

  // Serves until drained (SIGTERM, POST /drain or /quitquitquit). Returns the exit code.
  int run();

 private:
  struct BoundListener {
    std::string spec;  // listen address as configured; unchanged spec keeps the sockets
    uint16_t port = 0;
    std::vector<std::shared_ptr<Listener>> per_worker;
  };

  std::map<std::string, std::pair<std::string, HostPort>> wanted_listeners(
      const ProxyConfig& c) const;
  // Binds what is new in `config` and returns the set; throws on failure, leaving the old set.
  std::map<std::string, BoundListener> bind_listeners(const ProxyConfig& config);
  void swap_listeners(std::map<std::string, BoundListener> next);
  void publish(SnapshotPtr snapshot);
  void reload();
  void check_certificates();
  // Files, or the agent's SDS socket (waiting for the agent to come up); throws on failure.
  std::shared_ptr<const TlsContexts> load_identity(const ProxyConfig& config);
  // Off the admin thread: long polls the SDS socket with `step` until stopped, backing off
  // on errors. The steps post what changed (a rotated certificate, new services) to the
  // admin thread.
  void sds_loop(const char* what, const std::function<Result<bool>()>& step);
  Result<bool> sds_certificate_step();
  Result<bool> sds_services_step();
  std::shared_ptr<const ProxyConfig> with_hmac_keys(std::shared_ptr<const ProxyConfig> config,
                                                    const std::string& local_id);
  std::shared_ptr<const ProxyConfig> with_agent_services(
      std::shared_ptr<const ProxyConfig> file) const;
  void install_agent_services(std::vector<ServiceConfig> services);
  void install_sds_identity(const IdentityConfig& id, IdentityMaterial material,
                            const std::string& serial);
  void begin_drain(const std::string& why);
  void watch_drain();
  bool ready() const;
  HttpResponse handle_admin(const HttpRequest& request);
  boost::json::object certs_json() const;
  boost::json::object listeners_json() const;

  ProxyOptions options_;
  boost::asio::io_context io_;
  Metrics metrics_;
  std::unique_ptr<AccessLog> access_log_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::unique_ptr<HttpServer> admin_;  // loopback only (enforced by config)
  boost::asio::signal_set signals_;
  boost::asio::steady_timer cert_timer_;
  boost::asio::steady_timer drain_timer_;
  SnapshotPtr current_;
  std::map<std::string, BoundListener> listeners_;
  std::string cert_fingerprint_;  // mtimes and sizes of cert, key and CA files
  std::string last_cert_error_;
  uint64_t tls_generation_ = 0;
  // SDS: what the rotation thread watches; set on the admin thread, read by the thread.
  std::mutex sds_mutex_;
  IdentityConfig sds_identity_;
  std::string sds_serial_;
  std::atomic<bool> sds_stop_{false};
  std::thread sds_thread_, services_thread_, hmac_thread_;
  // What the HMAC refresh thread re-keys: the file's config and our identity (under sds_mutex_).
  std::shared_ptr<const ProxyConfig> hmac_base_;
  std::string hmac_local_id_;
  void hmac_refresh_loop();
  // services_from_agent: the file's config, and the services the agent last sent.
  std::shared_ptr<const ProxyConfig> file_config_;
  std::vector<ServiceConfig> agent_services_;
  std::string agent_services_revision_;  // under sds_mutex_
  bool draining_ = false;
  std::chrono::steady_clock::time_point drain_deadline_;
  int exit_code_ = 0;
};

}  // namespace weft
