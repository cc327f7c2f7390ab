#include "p2p/relay_server.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <deque>
#include <set>

#include "identity/ed25519_pem.h"
#include "identity/openssl_ptr.h"
#include "transport/tls/tls_stream.h"

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

std::string node_key_hex(const relay::NodeKey& key) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : key) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

Result<relay::NodeKey> node_key_from_pem(const std::string& public_pem) {
  return ed25519_public_from_pem(public_pem);
}

namespace {

bool verify_proof(const relay::Proof& proof, const std::vector<uint8_t>& message) {
  ossl::Key key(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, proof.key.data(), proof.key.size()));
  if (!key) return false;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  bool ok = EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, key.get()) == 1 &&
            EVP_DigestVerify(ctx, proof.signature.data(), proof.signature.size(), message.data(),
                             message.size()) == 1;
  EVP_MD_CTX_free(ctx);
  return ok;
}

}  // namespace

struct RelayServer::Impl {
  struct Client {
    relay::NodeKey key{};
    std::shared_ptr<TlsStream> tls;
    std::deque<std::vector<uint8_t>> queue;
    size_t queued = 0;
    asio::steady_timer wake;
    double tokens;
    Clock::time_point refilled = Clock::now();
    bool open = true;
    Client(asio::io_context& io, double burst) : wake(io), tokens(burst) {}
  };

  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> tls, RelayOptions options,
       IsMember is_member)
      : io(io),
        acceptor(io),
        tls(std::move(tls)),
        options(std::move(options)),
        is_member(std::move(is_member)) {}

  asio::io_context& io;
  tcp::acceptor acceptor;
  std::shared_ptr<asio::ssl::context> tls;
  RelayOptions options;
  IsMember is_member;
  RelayCounters counters;
  std::map<relay::NodeKey, std::shared_ptr<Client>> clients;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);

  void accept() {
    acceptor.async_accept(
        [this, alive = alive](const boost::system::error_code& ec, tcp::socket socket) {
          if (!*alive || !acceptor.is_open()) return;
          if (!ec) asio::co_spawn(io, session(std::move(socket)), [](std::exception_ptr) {});
          accept();
        });
  }

  void enqueue(Client& c, std::vector<uint8_t> frame) {
    if (!c.open) return;
    if (c.queued + frame.size() > options.max_queue_bytes) {
      ++counters.dropped_queue;  // a slow reader: drop, QUIC will retransmit
      return;
    }
    c.queued += frame.size();
    c.queue.push_back(std::move(frame));
    c.wake.cancel();
  }

  bool take_tokens(Client& c, size_t n) {
    const auto now = Clock::now();
    c.tokens = std::min(options.burst_bytes,
                        c.tokens + std::chrono::duration<double>(now - c.refilled).count() *
                                       options.rate_bytes_per_s);
    c.refilled = now;
    if (c.tokens < static_cast<double>(n)) return false;
    c.tokens -= static_cast<double>(n);
    return true;
  }

  asio::awaitable<void> writer(std::shared_ptr<Client> c) {
    boost::system::error_code ec;
    while (c->open) {
      if (c->queue.empty()) {
        c->wake.expires_at(asio::steady_timer::time_point::max());
        co_await c->wake.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      auto frame = relay::take_batch(c->queue, c->queued);
      co_await asio::async_write(*c->tls, asio::buffer(frame),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) c->open = false;
    }
  }

  // By value: callers pass the map's own pointer, which erase() below would destroy.
  void drop(std::shared_ptr<Client> c, const std::string& why) {
    if (!c->open && !clients.count(c->key)) return;
    c->open = false;
    c->wake.cancel();
    c->tls->close();
    auto it = clients.find(c->key);
    if (it != clients.end() && it->second == c) {
      clients.erase(it);
      --counters.clients;
      spdlog::debug("relay: {} left: {}", node_key_hex(c->key).substr(0, 16), why);
      // Peers that sent to it recently learn on their next send; tell everyone cheaply.
      for (auto& [k, other] : clients)
        enqueue(*other, relay::encode(relay::FrameType::peer_gone, c->key.data(), c->key.size()));
    }
  }

  asio::awaitable<void> session(tcp::socket socket) {
    boost::system::error_code ec;
    socket.set_option(tcp::no_delay(true), ec);
    auto stream = std::make_shared<TlsStream>(std::move(socket), tls->native_handle(),
                                              TlsStream::Role::server);
    // Handshake, upgrade and proof must finish in time, or the connection goes.
    auto deadline = std::make_shared<asio::steady_timer>(io, options.auth_timeout);
    auto authenticated = std::make_shared<bool>(false);
    deadline->async_wait([stream, authenticated](const boost::system::error_code& e) {
      if (e || *authenticated) return;
      stream->close();
    });
    co_await stream->async_handshake(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    std::string head;
    const size_t n =
        co_await asio::async_read_until(*stream, asio::dynamic_buffer(head, 8192), "\r\n\r\n",
                                        asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    const std::string request = head.substr(0, n);
    auto lower = request;
    for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (request.rfind("GET /v1/relay ", 0) != 0 ||
        lower.find("\r\nupgrade: weft-relay/1\r\n") == std::string::npos) {
      static const std::string body = "expected GET /v1/relay with Upgrade: weft-relay/1\n";
      static const std::string bad =
          "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
          "Content-Length: " +
          std::to_string(body.size()) + "\r\n\r\n" + body;
      co_await asio::async_write(*stream, asio::buffer(bad),
                                 asio::redirect_error(asio::use_awaitable, ec));
      co_return;
    }
    static const std::string switching =
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: weft-relay/1\r\n\r\n";
    co_await asio::async_write(*stream, asio::buffer(switching),
                               asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;

    relay::Challenge challenge{};
    RAND_bytes(challenge.data(), static_cast<int>(challenge.size()));
    auto exporter = relay::tls_exporter(stream->native_handle());
    if (!exporter) co_return;
    const auto hello = relay::challenge_frame(challenge);
    co_await asio::async_write(*stream, asio::buffer(hello),
                               asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;

    relay::FrameReader reader;
    reader.feed(reinterpret_cast<const uint8_t*>(head.data()) + n, head.size() - n);
    std::array<uint8_t, 65536> buf{};
    std::shared_ptr<Client> me;
    const auto fail = [&](const std::string& why) -> asio::awaitable<void> {
      ++counters.auth_failures;
      spdlog::warn("relay: refused a client: {}", why);
      const auto frame = relay::error_frame(why);
      boost::system::error_code ignored;
      co_await asio::async_write(*stream, asio::buffer(frame),
                                 asio::redirect_error(asio::use_awaitable, ignored));
    };
    for (;;) {
      auto next = reader.next();
      if (!next) {
        if (!me) co_await fail(next.error());
        break;
      }
      if (!*next) {
        const size_t got = co_await stream->async_read_some(
            asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
        if (ec) break;
        reader.feed(buf.data(), got);
        continue;
      }
      relay::Frame& f = **next;
      if (!me) {
        auto proof = relay::parse_proof(f);
        if (!proof) {
          co_await fail("expected the client proof first: " + proof.error());
          break;
        }
        if (!verify_proof(*proof, relay::proof_message(challenge, *exporter))) {
          co_await fail("the proof's signature does not verify");
          break;
        }
        if (!is_member(proof->key)) {
          co_await fail("node key " + node_key_hex(proof->key).substr(0, 16) +
                        "… is not a registered agent");
          break;
        }
        *authenticated = true;
        deadline->cancel();
        me = std::make_shared<Client>(io, options.burst_bytes);
        me->key = proof->key;
        me->tls = stream;
        if (auto old = clients.find(me->key); old != clients.end())
          drop(old->second, "replaced by a newer connection of the same node");
        clients[me->key] = me;
        ++counters.clients;
        spdlog::debug("relay: {} joined", node_key_hex(me->key).substr(0, 16));
        enqueue(*me, relay::encode(relay::FrameType::ready, nullptr, 0));
        asio::co_spawn(io, writer(me), asio::detached);
        continue;
      }
      if (f.type == relay::FrameType::ping) {
        enqueue(*me, relay::encode(relay::FrameType::pong, f.payload.data(), f.payload.size()));
        continue;
      }
      if (f.type != relay::FrameType::send_packet) continue;  // nothing else comes from clients
      auto packet = relay::parse_packet(f);
      if (!packet) continue;
      if (!take_tokens(*me, packet->len)) {
        ++counters.dropped_rate;
        continue;
      }
      auto dst = clients.find(packet->peer);
      if (dst == clients.end()) {
        ++counters.dropped_no_peer;
        enqueue(*me, relay::encode(relay::FrameType::peer_gone, packet->peer.data(),
                                   packet->peer.size()));
        continue;
      }
      ++counters.packets;
      counters.bytes += packet->len;
      enqueue(*dst->second, relay::packet_frame(relay::FrameType::recv_packet, me->key,
                                                packet->data, packet->len));
    }
    if (me) drop(me, ec ? ec.message() : "closed");
  }
};

RelayServer::RelayServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

RelayServer::~RelayServer() { close(); }

Result<std::unique_ptr<RelayServer>> RelayServer::bind(asio::io_context& io,
                                                       std::shared_ptr<asio::ssl::context> tls,
                                                       RelayOptions options, IsMember is_member) {
  auto impl = std::make_unique<Impl>(io, std::move(tls), options, std::move(is_member));
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(
      options.listen.host == "localhost" ? "127.0.0.1" : options.listen.host, ec);
  if (ec) return make_error("relay: " + options.listen.host + " is not an IP address");
  const tcp::endpoint ep(ip, options.listen.port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(1024, ec);
  if (ec)
    return make_error("relay: cannot listen on " + options.listen.to_string() + ": " +
                      ec.message());
  impl->accept();
  return std::unique_ptr<RelayServer>(new RelayServer(std::move(impl)));
}

uint16_t RelayServer::port() const {
  boost::system::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

const RelayCounters& RelayServer::counters() const { return impl_->counters; }

void RelayServer::close() {
  if (!impl_) return;
  *impl_->alive = false;
  boost::system::error_code ignored;
  impl_->acceptor.close(ignored);
  auto clients = impl_->clients;
  for (auto& [k, c] : clients) impl_->drop(c, "relay shutting down");
}

std::string RelayServer::metrics_text() const {
  const auto& c = impl_->counters;
  std::string out;
  const auto line = [&](const char* name, const char* help, const char* type, uint64_t v,
                        const std::string& labels = "") {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" +
           name + labels + " " + std::to_string(v) + "\n";
  };
  line("weft_relay_clients", "Clients connected and authenticated.", "gauge", c.clients);
  line("weft_relay_packets_total", "Datagrams forwarded.", "counter", c.packets);
  line("weft_relay_bytes_total", "Datagram bytes forwarded.", "counter", c.bytes);
  out +=
      "# HELP weft_relay_dropped_total Datagrams dropped, by reason.\n"
      "# TYPE weft_relay_dropped_total counter\n"
      "weft_relay_dropped_total{reason=\"queue_full\"} " +
      std::to_string(c.dropped_queue) + "\nweft_relay_dropped_total{reason=\"rate_limited\"} " +
      std::to_string(c.dropped_rate) + "\nweft_relay_dropped_total{reason=\"no_peer\"} " +
      std::to_string(c.dropped_no_peer) + "\n";
  line("weft_relay_auth_failures_total", "Clients refused at the proof.", "counter",
       c.auth_failures);
  return out;
}

}  // namespace weft
