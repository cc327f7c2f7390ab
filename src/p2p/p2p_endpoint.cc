#include "p2p/p2p_endpoint.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <openssl/pem.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <boost/asio/post.hpp>
#include <cstring>

#include "identity/openssl_ptr.h"
#include "p2p/relay_group.h"

#include <openssl/hmac.h>
#include "p2p/relay_server.h"
#include "p2p/stun.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

namespace weft {

namespace asio = boost::asio;
namespace json = boost::json;
using udp = asio::ip::udp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kMaxLearnedPeers = 1024;

std::string short_key(const relay::NodeKey& k) { return node_key_hex(k).substr(0, 12); }

std::string to_string(const udp::endpoint& e) {
  return HostPort{e.address().to_string(), e.port()}.to_string();
}

// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; everything above it (verified
// addresses, candidates, status) speaks plain IPv4 for them.
udp::endpoint unmapped(const udp::endpoint& e) {
  if (e.address().is_v6() && e.address().to_v6().is_v4_mapped())
    return {asio::ip::make_address_v4(asio::ip::v4_mapped, e.address().to_v6()), e.port()};
  return e;
}

void set_buffer(int fd, int opt, int force_opt, int bytes) {
  // Big buffers carry bursts at line rate; FORCE works past rmem_max when we are root.
  if (::setsockopt(fd, SOL_SOCKET, force_opt, &bytes, sizeof bytes) != 0)
    ::setsockopt(fd, SOL_SOCKET, opt, &bytes, sizeof bytes);
}

}  // namespace

struct P2pEndpoint::StunQuery {
  std::vector<udp::endpoint> servers;
  stun::TransactionId tx{};
  udp::endpoint target;
  bool second = false;
  NatReport report;
  Clock::time_point deadline;
  std::chrono::milliseconds rto{250};
  std::unique_ptr<asio::steady_timer> timer;
  std::function<void(Result<NatReport>)> done;
};

P2pEndpoint::P2pEndpoint(asio::io_context& io, P2pOptions o)
    : io_(io), options_(std::move(o)), socket_(io), ticker_(io) {
  rbuf_.resize(65536);
}

P2pEndpoint::~P2pEndpoint() {
  ticker_.cancel();
  for (auto& [k, p] : peers_)
    for (auto& c : p.conns) c->close("agent shutting down");
}

Result<std::unique_ptr<P2pEndpoint>> P2pEndpoint::start(asio::io_context& io, P2pOptions o) {
  std::unique_ptr<P2pEndpoint> e(new P2pEndpoint(io, std::move(o)));
  ossl::Bio bio(BIO_new_mem_buf(e->options_.private_pem.data(),
                                static_cast<int>(e->options_.private_pem.size())));
  e->key_.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  size_t len = e->self_key_.size();
  if (!e->key_ || EVP_PKEY_get_id(e->key_.get()) != EVP_PKEY_ED25519 ||
      EVP_PKEY_get_raw_public_key(e->key_.get(), e->self_key_.data(), &len) != 1)
    return make_error("P2P: the node key is not an Ed25519 private key");
  // Derived from the node key, so the same node after a restart (no state) answers packets
  // of its old connections with resets peers believe.
  {
    std::array<uint8_t, 32> secret{};
    std::array<uint8_t, 64> raw{};
    size_t raw_len = raw.size();
    EVP_PKEY_get_raw_private_key(e->key_.get(), raw.data(), &raw_len);
    static const char kLabel[] = "weft quic stateless reset v1";
    unsigned out_len = 0;
    HMAC(EVP_sha256(), raw.data(), static_cast<int>(raw_len),
         reinterpret_cast<const uint8_t*>(kLabel), sizeof kLabel - 1, secret.data(), &out_len);
    OPENSSL_cleanse(raw.data(), raw.size());
    e->options_.quic.reset_secret = secret;
  }
  boost::system::error_code ec;
  auto& listen = e->options_.listen;
  e->socket_.open(listen.protocol(), ec);
  if (ec && listen.address().is_v6() && listen.address().is_unspecified()) {
    // A host without IPv6: the same port on IPv4 alone.
    spdlog::info("p2p: no IPv6 here ({}); listening on IPv4 only", ec.message());
    listen = udp::endpoint(udp::v4(), listen.port());
    e->socket_.open(listen.protocol(), ec);
  }
  if (!ec && listen.address().is_v6() && listen.address().is_unspecified()) {
    // One socket for both families, so a peer's IPv4 and IPv6 candidates are probed from the
    // port it knows.
    boost::system::error_code ignored;
    e->socket_.set_option(asio::ip::v6_only(false), ignored);
  }
  if (!ec) e->socket_.bind(listen, ec);
  if (ec && listen.address().is_v6() && listen.address().is_unspecified()) {
    // IPv6 present but unusable (disabled on every interface): IPv4 alone, same port.
    spdlog::info("p2p: cannot bind {} ({}); listening on IPv4 only", to_string(listen),
                 ec.message());
    boost::system::error_code ignored;
    e->socket_.close(ignored);
    listen = udp::endpoint(udp::v4(), listen.port());
    e->socket_.open(listen.protocol(), ec);
    if (!ec) e->socket_.bind(listen, ec);
  }
  if (ec) return make_error("P2P: cannot bind UDP " + to_string(listen) + ": " + ec.message());
  e->v6_socket_ = listen.address().is_v6();
  e->socket_.non_blocking(true);
  const int fd = e->socket_.native_handle();
  set_buffer(fd, SO_RCVBUF, SO_RCVBUFFORCE, 8 << 20);
  set_buffer(fd, SO_SNDBUF, SO_SNDBUFFORCE, 8 << 20);
  int on = 1;
  ::setsockopt(fd, SOL_UDP, UDP_GRO, &on, sizeof on);  // older kernels: one datagram per read
  // QUIC datagrams must not be fragmented (RFC 9000, 14): the DF bit, and no fragmenting to a
  // path MTU the kernel learned. A datagram too big for the path is lost, which the padded
  // probes detect (see max_datagram), instead of silently arriving in pieces.
  int probe_mtu = IP_PMTUDISC_PROBE;
  ::setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &probe_mtu, sizeof probe_mtu);
  if (e->v6_socket_) {
    int probe_mtu6 = IPV6_PMTUDISC_PROBE;
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &probe_mtu6, sizeof probe_mtu6);
  }
  e->arm_read();
  e->tick();
  return e;
}

uint16_t P2pEndpoint::port() const {
  boost::system::error_code ec;
  return socket_.local_endpoint(ec).port();
}

void P2pEndpoint::set_tls(std::shared_ptr<const quic::QuicTls> tls) { tls_ = std::move(tls); }

void P2pEndpoint::set_peers(std::vector<P2pPeer> peers) {
  std::map<relay::NodeKey, P2pPeer> next;
  for (auto& p : peers)
    if (p.key != self_key_) next[p.key] = std::move(p);
  for (auto it = peers_.begin(); it != peers_.end();) {
    if (next.count(it->first) || it->second.learned) {
      ++it;
      continue;
    }
    // Gone from the mesh: its connections end, its addresses are no longer trusted.
    for (auto& c : it->second.conns) c->close("peer left the mesh");
    forget(it++);
  }
  for (auto& [key, info] : next) {
    auto& p = peers_[key];
    p.info = std::move(info);
    p.learned = false;
  }
}

void P2pEndpoint::set_own_candidates(std::vector<udp::endpoint> candidates) {
  if (candidates.size() > probe::kMaxOffered) candidates.resize(probe::kMaxOffered);
  own_candidates_ = std::move(candidates);
}

void P2pEndpoint::forget(std::map<relay::NodeKey, PeerState>::iterator it) {
  for (auto a = addresses_.begin(); a != addresses_.end();)
    a = a->second == it->first ? addresses_.erase(a) : std::next(a);
  peers_.erase(it);
}

P2pEndpoint::PeerState* P2pEndpoint::learn(const relay::NodeKey& key) {
  if (key == self_key_) return nullptr;
  size_t learned = 0;
  for (const auto& [k, p] : peers_) learned += p.learned;
  if (learned >= kMaxLearnedPeers) return nullptr;
  auto& p = peers_[key];
  p.info.key = key;
  p.info.name = short_key(key);
  p.learned = true;
  p.last_seen = Clock::now();
  return &p;
}

P2pEndpoint::PeerState* P2pEndpoint::find(const relay::NodeKey& key) {
  auto it = peers_.find(key);
  return it == peers_.end() ? nullptr : &it->second;
}

// ---------------------------------------------------------------- receiving

void P2pEndpoint::arm_read() {
  socket_.async_wait(udp::socket::wait_read,
                     [this, alive = std::weak_ptr(alive_)](const boost::system::error_code& ec) {
                       if (ec || !alive.lock()) return;
                       on_readable();
                       arm_read();
                     });
}

void P2pEndpoint::on_readable() {
  for (int i = 0; i < 64; ++i) {
    sockaddr_storage from{};
    iovec iov{rbuf_.data(), rbuf_.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(socket_.native_handle(), &msg, MSG_DONTWAIT);
    if (n < 0) break;
    size_t segment = static_cast<size_t>(n);
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
      if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
        int gso = 0;
        std::memcpy(&gso, CMSG_DATA(c), sizeof gso);
        if (gso > 0) segment = static_cast<size_t>(gso);
      }
    udp::endpoint sender;
    if (from.ss_family == AF_INET) {
      const auto* a = reinterpret_cast<const sockaddr_in*>(&from);
      sender = udp::endpoint(asio::ip::address_v4(ntohl(a->sin_addr.s_addr)), ntohs(a->sin_port));
    } else if (from.ss_family == AF_INET6) {
      const auto* a = reinterpret_cast<const sockaddr_in6*>(&from);
      asio::ip::address_v6::bytes_type b;
      std::memcpy(b.data(), &a->sin6_addr, 16);
      sender = unmapped(udp::endpoint(asio::ip::address_v6(b), ntohs(a->sin6_port)));
    } else {
      continue;
    }
    for (size_t off = 0; off < static_cast<size_t>(n); off += segment)
      dispatch(sender, rbuf_.data() + off, std::min(segment, static_cast<size_t>(n) - off));
  }
  // Answers to what we just read go out together.
  for (auto& [k, p] : peers_)
    for (auto& c : p.conns) c->flush();
}

void P2pEndpoint::dispatch(const udp::endpoint& from, const uint8_t* data, size_t len) {
  ++counters_.udp_in;
  if (len == 0) return;
  if (stun::looks_like_stun(data, len)) {
    auto m = stun::parse(data, len);
    if (!m) return void(++counters_.udp_garbage);
    for (auto& q : stun_) {
      if (m->transaction != q->tx || !q->done) continue;
      auto done = std::move(q->done);
      q->timer->cancel();
      if (!m->reflexive()) {
        done(make_error("the STUN answer has no mapped address"));
        continue;
      }
      if (!q->second) {
        q->report.local = socket_.local_endpoint();
        q->report.reflexive = *m->reflexive();
        q->report.server_software = m->software;
        std::optional<udp::endpoint> next;
        if (q->servers.size() > 1)
          next = q->servers[1];
        else if (m->other_address)
          next = *m->other_address;
        if (next && Clock::now() < q->deadline) {
          q->report.second_server = next;
          q->second = true;
          q->target = *next;
          q->done = std::move(done);
          q->tx = stun::new_transaction_id();
          q->rto = std::chrono::milliseconds(250);
          stun_send(q);
          continue;
        }
        done(q->report);
      } else {
        q->report.second_reflexive = *m->reflexive();
        done(q->report);
      }
    }
    std::erase_if(stun_, [](const auto& q) { return !q->done; });
    return;
  }
  if (probe::looks_like_probe(data, len)) return on_probe(from, data, len);
  // Everything else may be QUIC: ngtcp2 greases the fixed bit (RFC 9287), so the first byte
  // alone cannot tell; the connection-ID lookup and decryption decide.
  auto it = addresses_.find(from);
  if (it == addresses_.end()) {
    spdlog::debug("p2p: QUIC from {}, an address no probe verified", to_string(from));
    return void(++counters_.unknown_source);
  }
  // The peer sends from an address a probe verified: answer there (it moved, or restarted
  // on another port), as a QUIC server follows a migrating client.
  if (PeerState* p = find(it->second);
      p && p->direct != from &&
      !(p->dead_direct == from && Clock::now() - p->dead_at < options_.fast_probing)) {
    p->last_pong = Clock::now();
    set_path(*p, from, "its packets now come from there");
  }
  on_quic(it->second, data, len, false);
}

void P2pEndpoint::on_relay_packet(const relay::NodeKey& from, const uint8_t* data, size_t len) {
  ++counters_.relay_in;
  if (len == 0) return;
  if (probe::looks_like_probe(data, len)) return on_call_me_maybe(from, data, len);
  on_quic(from, data, len, true);  // the connection flushes once this burst is read
}

void P2pEndpoint::on_quic(const relay::NodeKey& peer, const uint8_t* data, size_t len,
                          bool via_relay) {
  PeerState* p = find(peer);
  // A node that may reach something we host dials us, though our view does not list it: the
  // relay vouches that control registered its key, and the handshake checks that its
  // certificate carries that key.
  if (!p && via_relay) p = learn(peer);
  if (!p) {
    spdlog::debug("p2p: QUIC from {}, which is not a known peer", short_key(peer));
    return void(++counters_.unknown_source);
  }
  p->last_seen = Clock::now();
  // It sends over the relay though we reach it directly: it lost the direct path, maybe we did.
  if (via_relay && p->direct) suspect_direct(*p, "its packets arrive over the relay");
  const auto header = quic::peek_header(data, len);
  if (!header) return void(++counters_.udp_garbage);
  if (auto it = cids_.find(header->dcid); it != cids_.end()) {
    auto conn = it->second.second.lock();
    if (it->second.first != peer || !conn) {
      spdlog::debug("p2p: QUIC from {} for a connection of {}", p->info.name,
                    conn ? short_key(it->second.first) : "nobody (closed)");
      return void(++counters_.unknown_source);
    }
    return conn->on_datagram(data, len);
  }
  if (!header->long_header || !tls_) {
    spdlog::debug("p2p: QUIC from {} for no connection we know", p->info.name);
    ++counters_.udp_garbage;
    // A stateless reset carries a random connection ID: only the connections themselves can
    // recognise its token (QUIC then closes the one it was meant for).
    if (!header->long_header) {
      auto conns = p->conns;
      for (auto& c : conns) c->on_datagram(data, len);
    }
    // A short-header packet for a connection we do not have: we restarted, or dropped it.
    // Tell the peer (a few per second at most), or it waits for its idle timeout.
    const auto now = std::chrono::steady_clock::now();
    if (now - last_reset_window_ >= std::chrono::seconds(1)) {
      last_reset_window_ = now;
      resets_in_window_ = 0;
    }
    if (!header->long_header && options_.quic.reset_secret && resets_in_window_ < 10) {
      auto reset = quic::stateless_reset_packet(*options_.quic.reset_secret, header->dcid, len);
      if (!reset.empty()) {
        ++resets_in_window_;
        ++counters_.stateless_resets;
        send_to_peer(peer, reset.data(), reset.size(), reset.size());
      }
    }
    return;
  }
  auto conn = quic::Connection::server(
      io_, tls_, options_.quic, peer, data, len,
      [this, peer](const uint8_t* d, size_t n, size_t seg) { send_to_peer(peer, d, n, seg); },
      hooks(peer));
  if (!conn) {
    spdlog::debug("p2p: QUIC from {} refused: {}", p->info.name, conn.error());
    return void(++counters_.udp_garbage);
  }
  spdlog::debug("p2p: {} is connecting", p->info.name);
  p->conns.push_back(*conn);
  if (p->fast_until < Clock::now()) p->fast_until = Clock::now() + options_.fast_probing;
  (*conn)->on_datagram(data, len);
}

// ---------------------------------------------------------------- probes

void P2pEndpoint::on_probe(const std::optional<udp::endpoint>& from, const uint8_t* data,
                           size_t len) {
  ++counters_.probes_in;
  auto pr = probe::parse(data, len);
  if (!pr) {
    ++counters_.probes_bad;
    spdlog::debug("p2p: probe dropped: {}", pr.error());
    return;
  }
  if (options_.relay_only) return;  // neither answered nor taken: no direct path may form
  if (pr->type == probe::Type::call_me_maybe || !from)
    return void(++counters_.probes_bad);  // offers come over the relay only
  PeerState* p = find(pr->sender);
  // Signed by a key we do not know: a node outside our view (it reaches what we host) or a
  // stranger. Answering costs one probe-sized datagram; its QUIC handshake must then show a
  // mesh certificate for this very key before anything else happens.
  if (!p && pr->type == probe::Type::ping) p = learn(pr->sender);
  if (!p) return void(++counters_.probes_unknown_key);
  p->last_seen = Clock::now();
  const auto now = Clock::now();
  if (pr->type == probe::Type::ping) {
    probe::Probe pong{probe::Type::pong, self_key_, pr->tx, from, {}};
    if (auto bytes = probe::encode(pong, key_.get()))
      send_udp(*from, bytes->data(), bytes->size(), bytes->size());
    // Its packets may come from here now; and pinging back opens our side of the NAT.
    addresses_[*from] = pr->sender;
    if (std::find(p->seen_from.begin(), p->seen_from.end(), *from) == p->seen_from.end())
      p->seen_from.push_back(*from);
    if (!p->direct) send_probe(*p, *from);
    return;
  }
  auto it = outstanding_.find(pr->tx);
  if (it == outstanding_.end() || it->second.peer != pr->sender || it->second.to != *from)
    return void(++counters_.probes_bad);  // not ours, or a replay from elsewhere
  const auto rtt = std::chrono::duration_cast<std::chrono::microseconds>(now - it->second.sent);
  if (it->second.full_size) p->full_size_direct = *from;
  outstanding_.erase(it);
  addresses_[*from] = pr->sender;
  p->last_pong = now;
  const auto previous_rtt = p->probe_rtt;
  p->probe_rtt = rtt;
  if (!p->direct || (*p->direct != *from && rtt < previous_rtt / 2))
    set_path(*p, *from, fmt::format("probe answered in {:.1f} ms", rtt.count() / 1000.0));
}

void P2pEndpoint::on_call_me_maybe(const relay::NodeKey& from, const uint8_t* data, size_t len) {
  ++counters_.probes_in;
  auto pr = probe::parse(data, len);
  // Pings and pongs test a direct path and prove nothing over the relay; an offer must come
  // from the very key the relay authenticated.
  if (!pr || pr->type != probe::Type::call_me_maybe || pr->sender != from) {
    spdlog::debug("p2p: relayed probe dropped: {}",
                  pr ? "not an offer from its sender" : pr.error());
    return void(++counters_.probes_bad);
  }
  if (options_.relay_only) return;
  PeerState* p = find(from);
  if (!p) p = learn(from);  // the relay vouches that control registered it
  if (!p) return;
  ++counters_.calls_in;
  const auto now = Clock::now();
  p->last_seen = now;
  if (now - p->last_call_in < std::chrono::seconds(1)) return;  // a peer cannot make us flood
  p->last_call_in = now;
  p->offered.clear();
  for (const auto& e : pr->offered)
    if (e.port() != 0 && !e.address().is_unspecified() && !e.address().is_multicast())
      p->offered.push_back(e);
  p->fast_until = now + options_.fast_probing;
  if (p->direct) {
    // It has no direct path to us, though we send to it directly: check ours.
    suspect_direct(*p, "the peer asks for a direct path");
    return;
  }
  spdlog::debug("p2p: {} offers {} addresses; probing them", p->info.name, p->offered.size());
  probe_round(*p);
}

void P2pEndpoint::probe_round(PeerState& p) {
  p.last_round = Clock::now();
  std::vector<udp::endpoint> sent;
  for (const auto* list : {&p.info.candidates, &p.offered, &p.seen_from})
    for (const auto& c : *list)
      if (std::find(sent.begin(), sent.end(), c) == sent.end()) {
        sent.push_back(c);
        send_probe(p, c);
      }
  send_call_me_maybe(p);
}

void P2pEndpoint::send_call_me_maybe(PeerState& p) {
  const auto now = Clock::now();
  if (options_.relay_only || own_candidates_.empty() || !relay_ || !relay_->connected() ||
      now - p.last_call_out < options_.call_me_maybe_interval)
    return;
  probe::Probe call{probe::Type::call_me_maybe, self_key_, probe::new_tx(), std::nullopt,
                    own_candidates_};
  auto bytes = probe::encode(call, key_.get());
  if (!bytes) return;
  p.last_call_out = now;
  ++counters_.calls_out;
  relay_->send(p.info.key, bytes->data(), bytes->size());
}

void P2pEndpoint::send_probe(PeerState& p, const udp::endpoint& to, bool full_size) {
  if (options_.relay_only) return;
  probe::Probe ping{probe::Type::ping, self_key_, probe::new_tx(), std::nullopt, {}};
  auto bytes = probe::encode(ping, key_.get(), full_size ? probe::kFullDatagram : 0);
  if (!bytes) return;
  outstanding_[ping.tx] = Outstanding{p.info.key, to, Clock::now(), full_size};
  send_udp(to, bytes->data(), bytes->size(), bytes->size());
}

void P2pEndpoint::set_path(PeerState& p, std::optional<udp::endpoint> direct,
                           const std::string& why) {
  const bool changed = p.direct != direct;
  p.direct = direct;
  if (!changed) return;
  p.last_change = Clock::now();
  p.last_change_why = why;
  p.suspect_since = {};
  ++p.path_changes;
  if (direct && p.full_size_direct != direct) send_probe(p, *direct, true);
  if (direct) send_unsent(p);
  spdlog::info("p2p: {} now {} ({})", p.info.name.empty() ? short_key(p.info.key) : p.info.name,
               direct ? "direct via " + to_string(*direct) : std::string("via the relay"), why);
}

void P2pEndpoint::tick() {
  const auto now = Clock::now();
  std::erase_if(outstanding_,
                [&](const auto& o) { return now - o.second.sent > std::chrono::seconds(10); });
  for (auto it = peers_.begin(); it != peers_.end();) {
    auto& p = it->second;
    std::erase_if(p.conns, [](const auto& c) { return c->closed(); });
    if (p.learned && p.conns.empty() && p.waiting.empty() &&
        now - p.last_seen > options_.learned_peer_linger)
      forget(it++);
    else
      ++it;
  }
  bool watching = false;  // some direct path carries a connection: check it often
  for (auto& [key, p] : peers_) {
    if (!p.unsent.empty() && relay_ && relay_->connected()) send_unsent(p);
    if (p.conns.empty()) {
      // No traffic, no probing; a direct path nobody confirms goes stale.
      if (p.direct && now - p.last_pong > options_.direct_timeout) p.direct.reset();
      continue;
    }
    if (p.direct) {
      if (now - p.last_pong > options_.direct_timeout) {
        lose_direct(p, now, "the direct path stopped answering");
      } else {
        check_direct(p, now);
        if (p.direct) {
          watching = true;
          if (now - p.last_ping >= options_.direct_ping) {
            // A lost full-size ping must not cost the path its liveness: it goes besides.
            if (p.full_size_direct != p.direct) send_probe(p, *p.direct, true);
            send_probe(p, *p.direct);
            p.last_ping = now;
          }
          continue;
        }
      }
    }
    const auto every = now < p.fast_until ? options_.probe_interval : options_.reprobe_interval;
    if (now - p.last_round < every) continue;
    probe_round(p);
  }
  ticker_.expires_after(watching ? options_.suspect_probe_interval
                                 : std::min(options_.probe_interval, options_.direct_ping));
  ticker_.async_wait([this, alive = std::weak_ptr(alive_)](const boost::system::error_code& ec) {
    if (!ec && alive.lock()) tick();
  });
}

void P2pEndpoint::suspect_direct(PeerState& p, const char* why) {
  if (!p.direct || p.suspect_since != Clock::time_point{}) return;
  const auto now = Clock::now();
  p.suspect_since = now;
  p.last_suspect_probe = now;
  ++counters_.direct_suspected;
  spdlog::debug("p2p: checking the direct path to {} ({})", p.info.name, why);
  send_probe(p, *p.direct);
  // The loss may be full-size datagrams only (the path MTU shrank, and no ICMP says so):
  // QUIC's minimum until a padded ping proves the size again, so the path is not a black hole.
  p.full_size_direct.reset();
  send_probe(p, *p.direct, true);
}

void P2pEndpoint::check_direct(PeerState& p, Clock::time_point now) {
  if (!p.direct) return;
  if (p.suspect_since == Clock::time_point{}) {
    for (const auto& c : p.conns)
      if (c->unanswered_probe_timeouts() > 0)
        return suspect_direct(p, "QUIC's probe timeout fired with data unacknowledged");
    return;
  }
  if (p.last_pong >= p.suspect_since) {  // a probe came back: the path works
    p.suspect_since = {};
    return;
  }
  std::chrono::microseconds quic_rtt{0};
  for (const auto& c : p.conns)
    if (c->established() && !c->closed()) quic_rtt = std::max(quic_rtt, c->smoothed_rtt());
  const auto window =
      std::max({std::chrono::duration_cast<std::chrono::microseconds>(options_.confirm_loss),
                4 * p.probe_rtt, 2 * quic_rtt});
  const auto waited = now - p.suspect_since;
  if (waited >= window)
    return lose_direct(
        p, now,
        fmt::format("no probe answered for {} ms",
                    std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()));
  if (now - p.last_suspect_probe >= options_.suspect_probe_interval) {
    send_probe(p, *p.direct);
    p.last_suspect_probe = now;
  }
}

void P2pEndpoint::lose_direct(PeerState& p, Clock::time_point now, const std::string& why) {
  ++counters_.direct_lost;
  p.dead_direct = p.direct;
  p.dead_at = now;
  set_path(p, std::nullopt, why);
  // Look for a way back at once, and keep looking quickly for a while.
  p.fast_until = now + options_.fast_probing;
  p.last_round = {};
}

// ---------------------------------------------------------------- sending

void P2pEndpoint::send_to_peer(const relay::NodeKey& peer, const uint8_t* data, size_t len,
                               size_t segment) {
  PeerState* p = find(peer);
  if (p && p->direct) {
    ++counters_.direct_out;
    return send_udp(*p->direct, data, len, segment);
  }
  if (relay_ && relay_->connected()) {
    for (size_t off = 0; off < len; off += segment) {
      ++counters_.relay_out;
      relay_->send(peer, data + off, std::min(segment, len - off));
    }
    return;
  }
  ++counters_.no_path;
  if (!p) return;
  for (size_t off = 0; off < len; off += segment) {
    p->unsent.emplace_back(data + off, data + std::min(len, off + segment));
    if (p->unsent.size() > 16) p->unsent.pop_front();
  }
}

void P2pEndpoint::send_unsent(PeerState& p) {
  auto unsent = std::move(p.unsent);
  p.unsent.clear();
  for (const auto& d : unsent) send_to_peer(p.info.key, d.data(), d.size(), d.size());
}

void P2pEndpoint::send_udp(const udp::endpoint& to_endpoint, const uint8_t* data, size_t len,
                           size_t segment) {
  const int fd = socket_.native_handle();
  udp::endpoint to = to_endpoint;
  if (v6_socket_ && to.address().is_v4())
    to = udp::endpoint(asio::ip::make_address_v6(asio::ip::v4_mapped, to.address().to_v4()),
                       to.port());
  else if (!v6_socket_ && to.address().is_v6())
    return void(++counters_.send_errors);  // an IPv6 candidate, and no IPv6 here
  if (len > segment && gso_) {
    iovec iov{const_cast<uint8_t*>(data), len};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(uint16_t))] = {};
    msghdr msg{};
    msg.msg_name = const_cast<sockaddr*>(to.data());
    msg.msg_namelen = static_cast<socklen_t>(to.size());
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    const uint16_t seg = static_cast<uint16_t>(segment);
    std::memcpy(CMSG_DATA(c), &seg, sizeof seg);
    if (::sendmsg(fd, &msg, 0) >= 0) return;
    if (errno != EIO && errno != EINVAL && errno != ENOPROTOOPT)
      return void(++counters_.send_errors);
    gso_ = false;  // no GSO here (old kernel, or a device without checksum offload)
    spdlog::info("p2p: UDP GSO unavailable ({}); sending datagrams one by one", strerror(errno));
  }
  for (size_t off = 0; off < len; off += segment)
    if (::sendto(fd, data + off, std::min(segment, len - off), 0, to.data(),
                 static_cast<socklen_t>(to.size())) < 0)
      ++counters_.send_errors;  // a full buffer drops it; QUIC's loss recovery resends
}

// ---------------------------------------------------------------- connections and tunnels

std::shared_ptr<quic::Connection> P2pEndpoint::usable(PeerState& p) const {
  for (auto& c : p.conns)
    if (c->established() && !c->closed()) return c;
  return nullptr;
}

static_assert(quic::kMaxDatagram <= relay::kMaxPacket, "a relay frame must hold QUIC's largest");

size_t P2pEndpoint::max_datagram(const PeerState& p) const {
  if (!p.direct) return quic::kMaxDatagram;  // the relay carries datagrams in a TLS stream
  return p.full_size_direct == p.direct ? probe::kFullDatagram : quic::kMinDatagram;
}

quic::Connection::Hooks P2pEndpoint::hooks(const relay::NodeKey& peer) {
  quic::Connection::Hooks h;
  h.max_datagram = [this, peer] {
    const PeerState* p = find(peer);
    return p ? max_datagram(*p) : quic::kMinDatagram;
  };
  h.on_cid = [this, peer](quic::Connection& c, const std::string& cid, bool added) {
    if (added)
      cids_[cid] = {peer, c.weak_from_this()};
    else
      cids_.erase(cid);
  };
  h.on_established = [this, peer](quic::Connection& c) {
    if (auto* p = find(peer); p && p->learned) {
      p->info.spiffe_id = c.peer_identity();
      p->info.name = c.peer_identity().substr(c.peer_identity().rfind('/') + 1);
    }
    if (auto* p = find(peer))
      spdlog::info("p2p: QUIC connection with {} ({}) established, {} path", p->info.name,
                   c.peer_identity(), p->direct ? "direct" : "relay");
    on_established(peer);
  };
  h.on_closed = [this, peer](quic::Connection& c, const std::string& why) {
    on_closed(peer, c, why);
  };
  h.on_stream = [this](quic::Connection& c, int64_t id) -> quic::StreamHandler* {
    if (!authorize_) return nullptr;
    ++counters_.tunnels_accepted;
    auto t = quic::QuicTunnel::accept(
        io_, c.shared_from_this(), id, authorize_,
        [done = accepted_done_, peer = c.peer_identity()](const quic::QuicTunnel& t,
                                                          const std::string& result) {
          spdlog::debug("p2p: tunnel from {} to {}: {} ({} B in, {} B out)", peer, t.authority(),
                        result, t.bytes_to_tcp(), t.bytes_from_tcp());
          if (done) done(peer, t, result);
        });
    return t.get();  // the tunnel keeps itself alive while the stream is open
  };
  return h;
}

void P2pEndpoint::dial(PeerState& p) {
  if (p.dialing || !tls_) return;
  const relay::NodeKey peer = p.info.key;
  auto conn = quic::Connection::client(
      io_, tls_, options_.quic, peer,
      [this, peer](const uint8_t* d, size_t n, size_t seg) { send_to_peer(peer, d, n, seg); },
      hooks(peer));
  if (!conn) {
    spdlog::warn("p2p: cannot dial {}: {}", p.info.name, conn.error());
    return;
  }
  p.dialing = true;
  p.conns.push_back(*conn);
  p.fast_until = Clock::now() + options_.fast_probing;
  p.last_round = {};
  (*conn)->flush();
  probe_round(p);
}

void P2pEndpoint::on_established(const relay::NodeKey& peer) {
  PeerState* p = find(peer);
  if (!p) return;
  p->dialing = false;
  // The peer knows us now (the relay carried the handshake): probe at once, so the direct
  // path is found in one round trip rather than at the next probe round.
  if (!p->direct) probe_round(*p);
  auto waiting = std::move(p->waiting);
  p->waiting.clear();
  for (auto& w : waiting) connect(peer, std::move(w.socket), w.authority, std::move(w.finished));
}

void P2pEndpoint::on_closed(const relay::NodeKey& peer, quic::Connection& c,
                            const std::string& why) {
  PeerState* p = find(peer);
  if (!p) return;
  spdlog::info("p2p: QUIC connection with {} closed: {}", p->info.name, why);
  if (c.role() == quic::Connection::Role::client) p->dialing = false;
  // Closed connections are dropped on the next tick (this is called from inside one). With
  // none left, the direct path is no longer confirmed by anything: probe again from scratch
  // (the peer may have restarted on another port).
  if (std::none_of(p->conns.begin(), p->conns.end(),
                   [&](const auto& x) { return x.get() != &c && !x->closed(); })) {
    set_path(*p, std::nullopt, "connection closed");
    p->fast_until = Clock::now() + options_.fast_probing;
    p->last_round = {};
  }
  if (!p->waiting.empty() && !usable(*p)) {
    auto waiting = std::move(p->waiting);
    p->waiting.clear();
    if (!c.established()) {
      for (auto& w : waiting)
        if (w.finished) w.finished("p2p_connect_failed: " + why, 0, 0);
    }
  }
}

void P2pEndpoint::connect(const relay::NodeKey& peer, asio::ip::tcp::socket socket,
                          const std::string& authority, Finished finished) {
  PeerState* p = find(peer);
  if (!p) {
    if (finished) finished("p2p_unknown_peer", 0, 0);
    return;
  }
  if (auto conn = usable(*p)) {
    ++counters_.tunnels_opened;
    auto t =
        quic::QuicTunnel::open(conn, std::move(socket), authority,
                               [finished](const quic::QuicTunnel& t, const std::string& result) {
                                 if (finished)
                                   finished(result, t.bytes_from_tcp(), t.bytes_to_tcp());
                               });
    if (!t && finished) finished("p2p_no_stream_available", 0, 0);
    return;
  }
  p->waiting.push_back(Waiting{std::move(socket), authority, std::move(finished)});
  dial(*p);
}

// ---------------------------------------------------------------- STUN

void P2pEndpoint::stun(const std::vector<udp::endpoint>& servers,
                       std::function<void(Result<NatReport>)> done) {
  if (servers.empty()) return done(make_error("no STUN server given"));
  auto q = std::make_shared<StunQuery>();
  q->servers = servers;
  q->target = servers.front();
  q->tx = stun::new_transaction_id();
  q->deadline = Clock::now() + std::chrono::seconds(3);
  q->timer = std::make_unique<asio::steady_timer>(io_);
  q->done = std::move(done);
  stun_.push_back(q);
  stun_send(q);
}

// Sends the current stage's request and resends it, doubling the wait, until the deadline.
void P2pEndpoint::stun_send(const std::shared_ptr<StunQuery>& q) {
  if (!q->done) return;
  if (Clock::now() >= q->deadline) {
    auto done = std::move(q->done);
    if (q->second)
      done(q->report);  // the first server answered; the mapping stays unknown
    else
      done(make_error("no STUN answer from " + to_string(q->target) + " (is UDP blocked?)"));
    std::erase_if(stun_, [](const auto& x) { return !x->done; });
    return;
  }
  const auto req = stun::binding_request(q->tx);
  send_udp(q->target, req.data(), req.size(), req.size());
  q->timer->expires_after(std::min<Clock::duration>(q->rto, q->deadline - Clock::now()));
  q->rto *= 2;
  q->timer->async_wait(
      [this, weak = std::weak_ptr<StunQuery>(q)](const boost::system::error_code& ec) {
        if (ec) return;
        if (auto q = weak.lock()) stun_send(q);
      });
}

// ---------------------------------------------------------------- status

json::object P2pEndpoint::status() const {
  json::array peers;
  const auto now = Clock::now();
  for (const auto& [key, p] : peers_) {
    std::shared_ptr<quic::Connection> conn;
    for (auto& c : p.conns)
      if (c->established() && !c->closed()) conn = c;
    json::object o{
        {"node_key", node_key_hex(key)},  {"name", p.info.name},
        {"spiffe_id", p.info.spiffe_id},  {"path", !conn ? "none" : p.direct ? "direct" : "relay"},
        {"connections", p.conns.size()},  {"path_changes", p.path_changes},
        {"max_datagram", max_datagram(p)}};
    if (p.direct) o["direct_address"] = to_string(*p.direct);
    if (conn) {
      o["rtt_ms"] = static_cast<double>(conn->smoothed_rtt().count()) / 1000.0;
      const auto cc = conn->congestion();
      o["cwnd_bytes"] = cc.cwnd;
      o["bytes_in_flight"] = cc.bytes_in_flight;
      o["delivery_mbit_s"] = static_cast<double>(cc.delivery_rate) * 8 / 1e6;
      o["streams"] = conn->open_streams();
    }
    if (!p.last_change_why.empty()) o["last_change_reason"] = p.last_change_why;
    if (p.last_change != Clock::time_point{})
      o["last_change_ago_s"] =
          std::chrono::duration_cast<std::chrono::milliseconds>(now - p.last_change).count() /
          1000.0;
    peers.push_back(std::move(o));
  }
  return json::object{{"port", port()}, {"node_key", node_key_hex(self_key_)}, {"peers", peers}};
}

std::string P2pEndpoint::metrics_text() const {
  std::string out;
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    out += fmt::format("# HELP weft_p2p_{} {}\n# TYPE weft_p2p_{} counter\nweft_p2p_{} {}\n", name,
                       help, name, name, v);
  };
  const auto& c = counters_;
  counter("udp_datagrams_total", "UDP datagrams received on the P2P port.", c.udp_in);
  counter("udp_garbage_total", "Datagrams dropped as neither STUN, probe nor QUIC.", c.udp_garbage);
  counter("unknown_source_total", "QUIC datagrams dropped from sources not proven by a probe.",
          c.unknown_source);
  counter("probes_total", "Path probes received.", c.probes_in);
  counter("stateless_resets_total",
          "QUIC stateless resets sent for packets of connections this node does not have.",
          c.stateless_resets);
  counter("probes_rejected_total", "Probes dropped: bad signature, malformed or unsolicited.",
          c.probes_bad);
  counter("probes_unknown_key_total", "Probes from keys that are not mesh peers.",
          c.probes_unknown_key);
  counter("relay_packets_in_total", "QUIC datagrams received over the relay.", c.relay_in);
  counter("relay_packets_out_total", "QUIC datagrams sent over the relay.", c.relay_out);
  counter("direct_sends_total", "Batches sent on direct paths.", c.direct_out);
  counter("send_errors_total", "UDP sends that failed.", c.send_errors);
  counter("no_path_total", "Batches dropped with neither a direct path nor a relay.", c.no_path);
  counter("tunnels_opened_total", "Tunnels opened to peers.", c.tunnels_opened);
  counter("tunnels_accepted_total", "Tunnels peers opened to us.", c.tunnels_accepted);
  counter("direct_suspected_total",
          "Times a direct path was checked at once because QUIC or the peer saw loss.",
          c.direct_suspected);
  counter("direct_lost_total", "Direct paths given up for the relay.", c.direct_lost);
  counter("calls_me_maybe_sent_total",
          "Offers of our addresses sent to peers over the relay (call-me-maybe).", c.calls_out);
  counter("calls_me_maybe_received_total", "Offers of addresses received from peers.", c.calls_in);
  out +=
      "# HELP weft_p2p_peer_path Current path per peer: 2 direct, 1 relay, 0 none.\n"
      "# TYPE weft_p2p_peer_path gauge\n";
  for (const auto& [key, p] : peers_) {
    bool up = false;
    for (auto& conn : p.conns) up = up || (conn->established() && !conn->closed());
    out += fmt::format("weft_p2p_peer_path{{peer=\"{}\"}} {}\n", p.info.name,
                       !up        ? 0
                       : p.direct ? 2
                                  : 1);
  }
  out +=
      "# HELP weft_p2p_peer_rtt_seconds Smoothed QUIC RTT per peer.\n"
      "# TYPE weft_p2p_peer_rtt_seconds gauge\n";
  for (const auto& [key, p] : peers_)
    for (auto& conn : p.conns)
      if (conn->established() && !conn->closed()) {
        out += fmt::format("weft_p2p_peer_rtt_seconds{{peer=\"{}\"}} {:.6f}\n", p.info.name,
                           conn->smoothed_rtt().count() / 1e6);
        break;
      }
  return out;
}

}  // namespace weft
