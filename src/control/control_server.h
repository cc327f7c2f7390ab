// `weft control`: join keys, agent registration (stable ID, mesh IP block, node certificate
// signed by the mesh CA), and the registry API over HTTPS. One thread; state lives in the store.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "control/store.h"
#include "core/duration.h"
#include "core/host_port.h"
#include "http/http_server.h"
#include "identity/csr.h"

namespace weft {

struct ControlOptions {
  std::filesystem::path data_dir = "weft-control";
  std::filesystem::path ca_dir;  // ca.crt + ca.key: a `weft ca init` root or a plug-in intermediate
  HostPort listen{"0.0.0.0", 8443};
  bool insecure_http = false;
  std::string mesh_cidr = "100.64.0.0/10";
  Millis node_cert_ttl = std::chrono::hours(24);
  Millis heartbeat_interval = std::chrono::seconds(10);  // 3 missed: unhealthy
  std::filesystem::path address_file;  // if set, the bound host:port is written here
};

class ControlServer {
 public:
  explicit ControlServer(ControlOptions options);  // throws std::runtime_error
  int run();

  // The operator token (admin.token in the data dir, 0600) that guards the registry API.
  static std::string load_or_create_admin_token(const std::filesystem::path& data_dir);

 private:
  HttpResponse handle(const HttpRequest& r);
  HttpResponse handle_register(const HttpRequest& r);
  HttpResponse handle_agents();
  HttpResponse handle_heartbeat(const HttpRequest& r);
  HttpResponse handle_create_key(const HttpRequest& r);
  bool is_operator(const HttpRequest& r) const;

  ControlOptions options_;
  MeshPool pool_;
  std::unique_ptr<ControlStore> store_;
  SigningCa ca_;
  std::string admin_token_;
  boost::asio::io_context io_;
  boost::asio::signal_set signals_;
  std::unique_ptr<HttpServer> http_;
};

}  // namespace weft
