// A worker: one thread, one io_context, its own listeners (SO_REUSEPORT), its own HBONE pool.
// Connections accepted here stay here for life. Other threads talk to a worker only by posting
// to it (snapshots, listeners, drain); nothing here is shared or locked.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "proxy/http/h2_downstream.h"
#include "proxy/http/health_checker.h"
#include "proxy/http/http_session.h"
#include "proxy/http/upstream_pool.h"
#include "proxy/listener/listener.h"
#include "proxy/snapshot.h"
#include "stats/access_log.h"
#include "stats/metrics.h"
#include "transport/hbone/h2_connection.h"
#include "transport/hbone/hbone_client_pool.h"

namespace weft {

class H2Connection;

class Worker {
 public:
  Worker(unsigned index, Metrics& metrics, AccessLog& access_log);
  ~Worker();

  boost::asio::io_context& io() { return io_; }
  void start();
  void stop_and_join();

  // Thread-safe: each posts to the worker's thread.
  void post_snapshot(SnapshotPtr snapshot);
  // `key` is "outbound/<name>", "inbound" or "l4/<name>".
  void post_listener(const std::string& key, std::shared_ptr<Listener> listener);
  void post_close_listener(const std::string& key);
  void post_drain();

 private:
  void on_accept(const std::string& key, boost::asio::ip::tcp::socket socket);
  void handle_outbound(const std::string& name, boost::asio::ip::tcp::socket socket);
  void handle_inbound(boost::asio::ip::tcp::socket socket);
  void handle_l4(const std::string& name, boost::asio::ip::tcp::socket socket);
  // Capture (src/proxy/capture): iptables-redirected connections, and SOCKS5 / HTTP proxy ones.
  void handle_transparent(boost::asio::ip::tcp::socket socket);
  void handle_explicit(boost::asio::ip::tcp::socket socket);
  void handle_inbound_capture(boost::asio::ip::tcp::socket socket);
  void explicit_socks5(std::shared_ptr<boost::asio::ip::tcp::socket> socket, AccessLogEntry entry);
  void serve_http(const OutboundListenerConfig& listener, boost::asio::ip::tcp::socket socket);
  void serve_http(const SnapshotPtr& snapshot, HttpListenerView view, ByteStream stream);
  void start_http_session(const SnapshotPtr& snapshot, HttpListenerView view, ByteStream stream,
                          std::string_view first_bytes);
  void explicit_http(std::shared_ptr<boost::asio::ip::tcp::socket> socket, AccessLogEntry entry);
  // Where a captured connection goes: a mesh service over HBONE, or straight out (egress).
  // `ready(downstream, failure)` runs once the path is open (failure empty) or could not be,
  // before bytes flow: the explicit proxy answers its client there.
  using Ready =
      std::function<void(boost::asio::ip::tcp::socket& downstream, const std::string& failure)>;
  void forward_captured(SnapshotPtr snap, boost::asio::ip::tcp::socket socket,
                        const std::string& name, const HostPort& destination, AccessLogEntry entry,
                        Ready ready, std::string prefix = {});
  // `prefix`: bytes that go upstream before the socket's (a rewritten request head).
  void open_mesh(const ServiceConfig& service, boost::asio::ip::tcp::socket socket,
                 AccessLogEntry entry, std::string prefix = {});
  void open_egress(const HostPort& target, boost::asio::ip::tcp::socket socket,
                   AccessLogEntry entry, Ready ready, std::string prefix = {});
  // L7: a new upstream HTTP connection to endpoint `ep` of `c`, through an HBONE stream.
  void dial_http_upstream(const Cluster& c, int ep, std::shared_ptr<UpstreamConn> conn,
                          UpstreamPool::Opened done);
  H2Connection::ConnectDecision accept_http_stream(const SnapshotPtr& snap,
                                                   const InboundTargetConfig& target,
                                                   const std::string& peer, AccessLogEntry entry);
  void start_inbound_tunnel(std::unique_ptr<TlsSocket> tls, const std::string& peer,
                            const std::string& downstream);

  unsigned index_;
  Metrics& metrics_;
  AccessLog& access_log_;
  boost::asio::io_context io_;
  std::thread thread_;
  SnapshotPtr snapshot_;
  HboneClientPool pool_;
  UpstreamPool http_pool_;  // L7 upstream connections, each an HBONE stream from pool_
  HttpWorkerEnv http_env_;
  std::shared_ptr<HealthChecker> health_;  // worker 0 only
  std::map<std::string, std::shared_ptr<Listener>> listeners_;
  std::map<H2Connection*, std::weak_ptr<H2Connection>> inbound_;
  std::set<TlsSocket*> handshaking_;  // inbound handshakes in flight, dropped at shutdown
  bool draining_ = false;
};

}  // namespace weft
