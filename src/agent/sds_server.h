// The agent's SDS socket: local `weft proxy` sidecars get their workload certificates here, as
// Envoy gets them from Istio's node agent, so a sidecar holds no control-plane credential and
// no key on disk. The agent makes a key per workload identity (in memory only), has control
// sign it (control checks that this node hosts the workload), renews it at 2/3 of its life,
// and answers a sidecar's long poll when the certificate changes. It also serves the mesh
// services this node's watched view can reach (the sidecar's config), long polled the same way.
//
// The socket's peer uid is the credential: the agent's own uid, root, and --sds-allow-uid.
#pragma once

#include <filesystem>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/array.hpp>

#include "core/duration.h"
#include "core/result.h"
#include "http/http_server.h"
#include "identity/csr.h"

namespace weft {

struct SdsOptions {
  std::filesystem::path socket;
  std::vector<int> allowed_uids;  // besides the agent's own uid and root
};

// Control's answer to a workload certificate request.
struct SignedWorkload {
  int status = 0;     // HTTP status from control; 0: control could not be reached
  std::string error;  // when status != 200
  std::string spiffe_id, certificate, ca_bundle;
};

// Control's answer to an HMAC pair-key request.
struct PairKey {
  int status = 0;
  std::string error, key;
  std::string previous;  // the key before control's last rotation (still verifies), or empty
  bool sign_with_previous = false;  // within the rotation's grace: signers keep the previous
};

class SdsServer {
 public:
  // Blocks (it calls control), so it runs on the SDS server's own thread.
  using Signer = std::function<SignedWorkload(const std::string& ns, const std::string& sa,
                                              const std::string& csr_pem)>;
  // The HMAC request-signing key of a workload pair (GET /v1/sds/hmac-key); blocks too.
  using PairKeyFetcher =
      std::function<PairKey(const std::string& source, const std::string& destination)>;

  static Result<std::unique_ptr<SdsServer>> start(boost::asio::io_context& io, SdsOptions options,
                                                  Signer sign, PairKeyFetcher pair_key = nullptr);
  ~SdsServer();
  boost::json::array status_json() const;  // the identities it serves, for the agent's /status
  // The services a sidecar may route to, as proxy config `services:` entries; call on the io
  // thread whenever the view changes. Waiting sidecars are answered if it differs.
  void set_services(const boost::json::array& services);

 private:
  struct Waiter {
    std::string known_serial;
    HttpServer::Reply reply;
    std::unique_ptr<boost::asio::steady_timer> deadline;
  };
  struct Workload {
    std::string ns, sa;
    KeyPair key;
    std::string spiffe_id, certificate, ca_bundle, serial;
    std::time_t not_before = 0, not_after = 0;
    int error_status = 0;
    std::string error;
    bool signing = false;
    std::list<Waiter> waiters;
    std::unique_ptr<boost::asio::steady_timer> renew;
  };

  SdsServer(boost::asio::io_context& io, SdsOptions options, Signer sign);
  void handle(const HttpRequest& r, HttpServer::Reply reply);
  void handle_services(const HttpRequest& r, HttpServer::Reply reply, Millis timeout);
  void handle_pair_key(const HttpRequest& r, HttpServer::Reply reply);
  HttpResponse services_response() const;
  void sign_async(Workload& w);
  void signed_(const std::string& key, SignedWorkload result);
  void answer_waiters(Workload& w);
  bool has_valid_certificate(const Workload& w) const;
  HttpResponse material(const Workload& w) const;
  void worker_loop();

  struct Shared;  // the queue to the signing thread
  boost::asio::io_context& io_;
  SdsOptions options_;
  Signer sign_;
  PairKeyFetcher pair_key_;
  std::unique_ptr<HttpServer> server_;
  std::map<std::string, Workload> workloads_;  // "ns/sa"
  std::string services_;                       // serialized array
  int64_t services_revision_ = 0;
  std::list<Waiter> services_waiters_;  // known_serial holds the revision they have
  std::shared_ptr<Shared> shared_;
};

}  // namespace weft
