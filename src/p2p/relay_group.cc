#include "p2p/relay_group.h"

#include <spdlog/spdlog.h>

namespace weft {

namespace {
// How long a relay's "peer not connected here" holds: long enough not to hammer it, short
// enough that a peer reconnecting to it is used again soon.
constexpr auto kAbsentFor = std::chrono::seconds(5);
}  // namespace

RelayGroup::RelayGroup(boost::asio::io_context& io, RelayClientOptions base,
                       RelayClient::OnPacket on_packet)
    : io_(io), base_(std::move(base)), on_packet_(std::move(on_packet)) {}

RelayGroup::~RelayGroup() { stop(); }

void RelayGroup::set_relays(const std::vector<HostPort>& relays) {
  if (relays == addresses_) return;
  std::vector<std::unique_ptr<Member>> next;
  for (const auto& address : relays) {
    auto kept = std::find_if(members_.begin(), members_.end(),
                             [&](const auto& m) { return m && m->address == address; });
    if (kept != members_.end()) {
      next.push_back(std::move(*kept));
      continue;
    }
    auto m = std::make_unique<Member>();
    m->address = address;
    RelayClientOptions o = base_;
    o.host = address.host;
    o.port = address.port;
    m->client = std::make_unique<RelayClient>(io_, std::move(o), on_packet_);
    Member* raw = m.get();
    m->client->on_peer_gone([raw](const relay::NodeKey& peer) {
      raw->absent[peer] = std::chrono::steady_clock::now() + kAbsentFor;
    });
    m->client->start();
    next.push_back(std::move(m));
  }
  for (auto& m : members_)
    if (m) {
      spdlog::info("relay {}: no longer listed; disconnecting", m->address.to_string());
      m->client->stop();
    }
  members_ = std::move(next);
  addresses_ = relays;
  last_used_ = nullptr;
}

bool RelayGroup::connected() const {
  return std::any_of(members_.begin(), members_.end(),
                     [](const auto& m) { return m->client->connected(); });
}

RelayGroup::Member* RelayGroup::pick(const relay::NodeKey& to) {
  const auto now = std::chrono::steady_clock::now();
  Member* fallback = nullptr;  // every connected relay said absent: try the first anyway
  for (auto& m : members_) {
    if (!m->client->connected()) continue;
    if (!fallback) fallback = m.get();
    auto it = m->absent.find(to);
    if (it == m->absent.end()) return m.get();
    if (it->second < now) {
      m->absent.erase(it);
      return m.get();
    }
  }
  return fallback;
}

bool RelayGroup::send(const relay::NodeKey& to, const uint8_t* data, size_t len) {
  Member* m = pick(to);
  if (!m) return false;
  if (m != last_used_) {
    if (last_used_) {
      ++failovers_;
      spdlog::info("relay: sending through {} now", m->address.to_string());
    }
    last_used_ = m;
  }
  return m->client->send(to, data, len);
}

void RelayGroup::stop() {
  for (auto& m : members_) m->client->stop();
}

boost::json::array RelayGroup::status() const {
  boost::json::array out;
  const Member* home = nullptr;
  for (const auto& m : members_)
    if (m->client->connected()) {
      home = m.get();
      break;
    }
  for (const auto& m : members_)
    out.push_back({{"address", m->address.to_string()},
                   {"state", m->client->state()},
                   {"home", m.get() == home}});
  return out;
}

}  // namespace weft
