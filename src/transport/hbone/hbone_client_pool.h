// Per-worker pool of outbound HBONE connections, one set per destination service (and so per
// destination identity; the source identity is the proxy's own). App connections are spread
// over pooled tunnels up to max_streams each; a tunnel idle for idle_timeout closes; a broken
// one is dropped, and the next app connection dials again (reconnect).
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "config/proxy_config.h"
#include "stats/metrics.h"
#include "transport/hbone/h2_connection.h"
#include "transport/tls/tls_contexts.h"

namespace weft {

class TunnelStream;

class HboneClientPool {
 public:
  HboneClientPool(boost::asio::io_context& io, Metrics& metrics);
  ~HboneClientPool();

  // New TLS material or pool settings: tunnels opened from now on use them; open ones finish
  // their streams and close.
  void update(std::shared_ptr<const TlsContexts> tls, PoolConfig pool);

  // Opens a CONNECT stream to `service` for `stream`, dialing a tunnel if none has room.
  // On failure the stream is failed with a reason for the access log.
  void open(const ServiceConfig& service, std::shared_ptr<TunnelStream> stream);

  // Drain: no new streams on existing tunnels; each closes when its last stream ends.
  void retire_all();
  // At exit: closes every tunnel still open, retired ones too (see H2Connection::shutdown).
  void shutdown();

 private:
  struct Waiter {
    std::string authority;
    std::shared_ptr<TunnelStream> stream;
  };
  struct Entry {
    ServiceConfig service;  // as of the latest open(), for dialing more tunnels
    std::vector<std::shared_ptr<H2Connection>> connections;
    std::deque<Waiter> waiting;
    bool dialing = false;
  };

  void dial(const ServiceConfig& service);
  void on_dialed(const std::string& service, std::shared_ptr<H2Connection> conn,
                 const std::string& error);
  void remove(H2Connection* conn);

  boost::asio::io_context& io_;
  Metrics& metrics_;
  std::shared_ptr<const TlsContexts> tls_;
  PoolConfig config_;
  std::map<std::string, Entry> entries_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::vector<std::weak_ptr<void>> dialers_;          // in flight; abandoned at shutdown
  std::vector<std::weak_ptr<H2Connection>> retired_;  // still finishing their streams
};

}  // namespace weft
