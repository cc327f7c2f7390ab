// The relay: forwards QUIC datagrams between nodes that cannot reach each other directly, over
// TLS and an HTTP upgrade so that it crosses firewalls that allow only HTTPS (wire format:
// docs/relay-protocol.md). A client proves its node key on every connection; `is_member`
// decides which keys may use the relay (control answers from its registry).
//
// Each client has a bounded send queue and a token-bucket rate limit: a slow reader loses
// datagrams (QUIC retransmits) instead of growing the relay's memory, and a flooding sender is
// cut down to its rate. Runs on the io_context it is given.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>

#include "core/host_port.h"
#include "core/result.h"
#include "p2p/relay_frame.h"

namespace weft {

struct RelayOptions {
  HostPort listen{"0.0.0.0", 8444};
  size_t max_queue_bytes = 1 << 20;  // per client
  // Per client. High: users of other relays complain of throttling; this bounds a flood, not
  // a transfer (250 MB/s = 2 Gbit/s).
  double rate_bytes_per_s = 250e6;
  double burst_bytes = 16e6;
  std::chrono::milliseconds auth_timeout{10000};  // TLS + upgrade + proof
};

struct RelayCounters {
  std::atomic<uint64_t> clients{0}, packets{0}, bytes{0}, dropped_queue{0}, dropped_rate{0},
      dropped_no_peer{0}, auth_failures{0};
};

class RelayServer {
 public:
  using IsMember = std::function<bool(const relay::NodeKey&)>;
  static Result<std::unique_ptr<RelayServer>> bind(boost::asio::io_context& io,
                                                   std::shared_ptr<boost::asio::ssl::context> tls,
                                                   RelayOptions options, IsMember is_member);
  ~RelayServer();
  uint16_t port() const;
  const RelayCounters& counters() const;
  std::string metrics_text() const;  // Prometheus exposition
  void close();

 private:
  struct Impl;
  explicit RelayServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Hex of a node key, for logs.
std::string node_key_hex(const relay::NodeKey& key);
// The raw Ed25519 key inside a PEM public key; errors for other key types.
Result<relay::NodeKey> node_key_from_pem(const std::string& public_pem);

}  // namespace weft
