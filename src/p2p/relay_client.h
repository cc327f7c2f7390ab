// A node's connection to its relay: TLS to the relay (verified against the mesh CA), the
// weft-relay/1 upgrade, the key proof, then datagrams both ways. It reconnects by itself with
// backoff and jitter, so the QUIC endpoint above always has a path, even before hole punching
// (and after it fails). Runs on the io_context it is given; every call on that thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "p2p/relay_frame.h"

namespace weft {

struct RelayClientOptions {
  std::string host;
  uint16_t port = 0;
  std::string ca_file;      // the mesh CA bundle
  std::string private_pem;  // the node key; kept in memory, never logged
  size_t max_queue_bytes = 1 << 20;
  // Liveness: a ping this often; a relay that sends nothing (not even the pong) for
  // `dead_after` is taken for dead, so the node fails over instead of waiting on TCP.
  std::chrono::milliseconds ping_interval{1000};
  std::chrono::milliseconds dead_after{3000};
};

class RelayClient {
 public:
  using OnPacket = std::function<void(const relay::NodeKey& from, const uint8_t* data, size_t len)>;
  // The relay said a node we sent to is not connected to it.
  using OnPeerGone = std::function<void(const relay::NodeKey& peer)>;

  RelayClient(boost::asio::io_context& io, RelayClientOptions options, OnPacket on_packet);
  ~RelayClient();
  void on_peer_gone(OnPeerGone f);
  void start();
  void stop();
  // Queued for the relay; dropped (false) while not connected or when the queue is full.
  bool send(const relay::NodeKey& to, const uint8_t* data, size_t len);
  // "connecting", "connected", or "disconnected: <why>".
  const std::string& state() const;
  bool connected() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace weft
