// A node's relays, in the order control lists them. Every relay gets its own connection, so a
// peer stays reachable on whichever relay both sides still hold: packets leave through the
// first connected relay (the "home"), and when it dies — its connection closes, or it goes
// silent past the client's liveness deadline — they leave through the next one at once. A
// relay that answers "peer not connected here" is skipped for that peer for a few seconds,
// which covers a peer that lost only its own connection to the home relay.
// Runs on the io_context it is given; every call on that thread.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/json/array.hpp>

#include "core/host_port.h"
#include "p2p/relay_client.h"

namespace weft {

class RelayGroup {
 public:
  // `base` carries everything but the address (CA bundle, node key, liveness).
  RelayGroup(boost::asio::io_context& io, RelayClientOptions base, RelayClient::OnPacket on_packet);
  ~RelayGroup();
  // Keeps the clients of relays still listed (their connections stay up), starts new ones and
  // stops the ones gone; the order is the preference.
  void set_relays(const std::vector<HostPort>& relays);
  const std::vector<HostPort>& relays() const { return addresses_; }
  bool connected() const;
  // Through the first connected relay that has not just said `to` is absent; false when none.
  bool send(const relay::NodeKey& to, const uint8_t* data, size_t len);
  void stop();
  // [{address, state, home}] for /status.
  boost::json::array status() const;
  uint64_t failovers() const { return failovers_; }

 private:
  struct Member {
    HostPort address;
    std::unique_ptr<RelayClient> client;
    std::map<relay::NodeKey, std::chrono::steady_clock::time_point> absent;  // until when
  };
  Member* pick(const relay::NodeKey& to);

  boost::asio::io_context& io_;
  RelayClientOptions base_;
  RelayClient::OnPacket on_packet_;
  std::vector<HostPort> addresses_;
  std::vector<std::unique_ptr<Member>> members_;
  const Member* last_used_ = nullptr;
  uint64_t failovers_ = 0;
};

}  // namespace weft
