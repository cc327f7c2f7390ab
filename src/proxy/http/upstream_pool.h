// Per-worker pool of upstream HTTP/1.1 connections, one set per (service, endpoint). A mesh
// endpoint's connection is an HBONE CONNECT stream to the endpoint's proxy, which the HTTP side
// reads and writes in process through a TunnelPipe; an inbound proxy's local app is a plain TCP
// connection. Both are a ByteStream, so the L7 code is the same either way.
//
// Idle connections close after the service's idle_timeout, chosen below the app's keep-alive,
// and one the app closed anyway is noticed (a peek) before it is reused: a request is never
// written into a connection that is already gone, the 503 race Envoy users meet.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>

#include "proxy/http/cluster.h"
#include "transport/hbone/byte_stream.h"

namespace weft {

class H2Upstream;

struct UpstreamConn {
  UpstreamConn(ByteStream s, std::string k, std::shared_ptr<BreakerState> b)
      : socket(std::move(s)), key(std::move(k)), breakers(std::move(b)) {
    breakers->connections.fetch_add(1, std::memory_order_relaxed);
  }
  ~UpstreamConn() { breakers->connections.fetch_sub(1, std::memory_order_relaxed); }
  UpstreamConn(const UpstreamConn&) = delete;
  UpstreamConn& operator=(const UpstreamConn&) = delete;

  ByteStream socket;  // TCP to a direct endpoint or an app; an HBONE stream's pipe otherwise
  boost::beast::flat_buffer buffer;
  std::string key;  // service|endpoint
  std::shared_ptr<BreakerState> breakers;
  std::string peer_identity;  // the endpoint proxy's SPIFFE ID
  SteadyMillis idle_since = 0;
  Millis idle_timeout{0};
  bool reused = false;
};

class UpstreamPool {
 public:
  using Opened = std::function<void(std::shared_ptr<UpstreamConn>, const std::string& failure)>;
  // Connects `conn` (a fresh, unopened socket) to the endpoint: over an HBONE stream, or
  // directly for a `direct` endpoint; `done` gets `conn` back when it is usable, or a failure.
  using Dial = std::function<void(const Cluster&, int endpoint, std::shared_ptr<UpstreamConn> conn,
                                  Opened done)>;

  UpstreamPool(boost::asio::io_context& io, Dial dial);
  ~UpstreamPool();

  static const std::string& key(const Cluster& c, int endpoint);

  // An idle connection that is still open, or null.
  std::shared_ptr<UpstreamConn> take_idle(const Cluster& c, int endpoint);
  // A new connection (counts against max_connections from now).
  void open(const Cluster& c, int endpoint, Opened done);
  void put_idle(std::shared_ptr<UpstreamConn> conn);
  // HTTP/2 endpoints: a shared connection with room for one more stream, or null. Connections
  // close themselves when idle past the service's idle_timeout; closed ones are dropped here.
  std::shared_ptr<H2Upstream> take_h2(const Cluster& c, int endpoint);
  // Starts HTTP/2 on a freshly opened connection; `share`: later streams may use it too.
  std::shared_ptr<H2Upstream> adopt_h2(const Cluster& c, int endpoint,
                                       std::shared_ptr<UpstreamConn> conn, bool share);

  // HTTP/2 endpoints, when take_h2 found no room. A stream joins a connection already being
  // opened to the endpoint, up to that connection's stream limit, rather than opening its own
  // (as Envoy attaches pending streams to a connecting client): 160 streams arriving together
  // would otherwise open 160 connections of one stream each, with no batching between them.
  // `ready` runs once, with the connection up, or null and why not.
  using H2Ready = std::function<void(std::shared_ptr<H2Upstream>, const std::string& failure)>;
  // False when no connection being opened to the endpoint has room for one more stream.
  bool join_h2_connecting(const Cluster& c, int endpoint, H2Ready ready);
  // Opens a connection (counted against max_connections from now) for the caller, first in
  // line, and, when `share`, for the streams that join it meanwhile and later.
  void open_h2(const Cluster& c, int endpoint, bool share, H2Ready ready);
  // Drain: nothing is shared from now on; the pooled HTTP/2 connections close once idle.
  void clear();

 private:
  struct H2Connecting {
    std::vector<H2Ready> waiters;
  };
  void arm_sweep();
  std::shared_ptr<H2Upstream> adopt_h2(const std::string& key, std::shared_ptr<UpstreamConn> conn,
                                       bool share);

  boost::asio::io_context& io_;
  Dial dial_;
  std::map<std::string, std::vector<std::shared_ptr<UpstreamConn>>> idle_;
  std::map<std::string, std::vector<std::shared_ptr<H2Upstream>>> h2_;
  std::map<std::string, std::vector<std::shared_ptr<H2Connecting>>> h2_connecting_;
  bool cleared_ = false;
  boost::asio::steady_timer sweep_;
  bool sweeping_ = false;
};

}  // namespace weft
