#include "p2p/relay_client.h"

#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <deque>
#include <random>

#include "transport/tls/tls_stream.h"

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

struct RelayClient::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io, RelayClientOptions options, OnPacket on_packet)
      : io(io), options(std::move(options)), on_packet(std::move(on_packet)), wake(io), retry(io) {}

  asio::io_context& io;
  RelayClientOptions options;
  OnPacket on_packet;
  OnPeerGone on_peer_gone;
  std::string state = "connecting";
  bool running = false, up = false;
  std::shared_ptr<TlsStream> stream;
  std::deque<std::vector<uint8_t>> queue;
  size_t queued = 0;
  asio::steady_timer wake, retry;
  std::chrono::steady_clock::time_point last_heard{};
  std::mt19937 rng{std::random_device{}()};

  asio::awaitable<void> run() {
    auto self = shared_from_this();
    std::chrono::milliseconds backoff(500);
    while (running) {
      const std::string why = co_await connect_once();
      up = false;
      if (!running) break;
      state = "disconnected: " + why;
      spdlog::warn("relay {}:{}: {}; retrying in about {} ms", options.host, options.port, why,
                   backoff.count());
      // Jitter: a relay that restarts must not see every node come back in the same instant.
      const auto jittered = std::chrono::milliseconds(
          std::uniform_int_distribution<int64_t>(backoff.count() / 2, backoff.count())(rng));
      retry.expires_after(jittered);
      boost::system::error_code ec;
      co_await retry.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      backoff = std::min(backoff * 2, std::chrono::milliseconds(15000));
    }
  }

  // One connection's life; returns why it ended.
  asio::awaitable<std::string> connect_once() {
    boost::system::error_code ec;
    asio::ssl::context ctx(asio::ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION);
    ctx.load_verify_file(options.ca_file, ec);
    if (ec) co_return "cannot load CA bundle " + options.ca_file + ": " + ec.message();
    ctx.set_verify_mode(asio::ssl::verify_peer);
    tcp::resolver resolver(io);
    auto found = co_await resolver.async_resolve(options.host, std::to_string(options.port),
                                                 asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return "cannot resolve " + options.host;
    tcp::socket socket(io);
    co_await asio::async_connect(socket, found, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return "cannot connect: " + ec.message();
    socket.set_option(tcp::no_delay(true), ec);
    // The SSL object holds its own reference to the context, which may go out of scope.
    stream = std::make_shared<TlsStream>(std::move(socket), ctx.native_handle(),
                                         TlsStream::Role::client);
    if (!running) stream->close();  // stopped while connecting: stop() saw no stream to close
    co_await stream->async_handshake(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return "TLS: " + (stream->error().empty() ? ec.message() : stream->error());
    const std::string upgrade = "GET /v1/relay HTTP/1.1\r\nHost: " + options.host +
                                "\r\nConnection: Upgrade\r\nUpgrade: weft-relay/1\r\n\r\n";
    co_await asio::async_write(*stream, asio::buffer(upgrade),
                               asio::redirect_error(asio::use_awaitable, ec));
    std::string head;
    const size_t n =
        co_await asio::async_read_until(*stream, asio::dynamic_buffer(head, 8192), "\r\n\r\n",
                                        asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return "upgrade: " + ec.message();
    if (head.rfind("HTTP/1.1 101", 0) != 0)
      co_return "the relay refused the upgrade: " + head.substr(0, head.find('\r'));
    relay::FrameReader reader;
    reader.feed(reinterpret_cast<const uint8_t*>(head.data()) + n, head.size() - n);
    std::array<uint8_t, 65536> buf{};
    bool proven = false;
    for (;;) {
      auto next = reader.next();
      if (!next) co_return "bad frame from the relay: " + next.error();
      if (!*next) {
        const size_t got = co_await stream->async_read_some(
            asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return "connection lost: " + ec.message();
        reader.feed(buf.data(), got);
        last_heard = std::chrono::steady_clock::now();
        continue;
      }
      relay::Frame& f = **next;
      if (f.type == relay::FrameType::server_challenge && !proven) {
        auto challenge = relay::parse_challenge(f);
        auto exporter = relay::tls_exporter(stream->native_handle());
        if (!challenge || !exporter) co_return "bad challenge";
        auto proof = relay::sign_proof(options.private_pem, *challenge, *exporter);
        if (!proof) co_return proof.error();
        co_await asio::async_write(*stream, asio::buffer(*proof),
                                   asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return "connection lost: " + ec.message();
        proven = true;
      } else if (f.type == relay::FrameType::ready) {
        up = true;
        state = "connected";
        last_heard = std::chrono::steady_clock::now();
        spdlog::info("relay {}:{}: connected", options.host, options.port);
        asio::co_spawn(io, writer(stream), asio::detached);
        asio::co_spawn(io, watchdog(stream), asio::detached);
      } else if (f.type == relay::FrameType::error) {
        co_return "refused: " + std::string(f.payload.begin(), f.payload.end());
      } else if (f.type == relay::FrameType::recv_packet) {
        if (auto p = relay::parse_packet(f); p && on_packet) on_packet(p->peer, p->data, p->len);
      } else if (f.type == relay::FrameType::ping) {
        enqueue(relay::encode(relay::FrameType::pong, f.payload.data(), f.payload.size()));
      } else if (f.type == relay::FrameType::peer_gone && f.payload.size() == 32) {
        relay::NodeKey k{};
        std::copy(f.payload.begin(), f.payload.end(), k.begin());
        if (on_peer_gone) on_peer_gone(k);
      }
    }
  }

  asio::awaitable<void> writer(std::shared_ptr<TlsStream> s) {
    auto self = shared_from_this();
    boost::system::error_code ec;
    while (running && s == stream) {
      if (queue.empty()) {
        wake.expires_at(asio::steady_timer::time_point::max());
        co_await wake.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      auto frame = relay::take_batch(queue, queued);
      co_await asio::async_write(*s, asio::buffer(frame),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        s->close();  // the reader sees it and reconnects
        co_return;
      }
    }
  }

  // Pings the relay and closes the connection when it has gone silent: a relay host that
  // vanished (no FIN, no RST) would otherwise hold the node until TCP gives up, minutes later.
  asio::awaitable<void> watchdog(std::shared_ptr<TlsStream> s) {
    auto self = shared_from_this();
    asio::steady_timer tick(io);
    boost::system::error_code ec;
    uint64_t seq = 0;
    while (running && up && s == stream) {
      tick.expires_after(options.ping_interval);
      co_await tick.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (!running || !up || s != stream) break;
      if (std::chrono::steady_clock::now() - last_heard > options.dead_after) {
        spdlog::warn("relay {}:{}: silent for {} ms; reconnecting", options.host, options.port,
                     options.dead_after.count());
        s->close();  // the reader sees it and reconnects
        break;
      }
      ++seq;
      uint8_t payload[8];
      for (int i = 0; i < 8; ++i) payload[i] = static_cast<uint8_t>(seq >> (56 - 8 * i));
      enqueue(relay::encode(relay::FrameType::ping, payload, sizeof payload));
    }
  }

  bool enqueue(std::vector<uint8_t> frame) {
    if (!up || queued + frame.size() > options.max_queue_bytes) return false;
    queued += frame.size();
    queue.push_back(std::move(frame));
    wake.cancel();
    return true;
  }
};

RelayClient::RelayClient(asio::io_context& io, RelayClientOptions options, OnPacket on_packet)
    : impl_(std::make_shared<Impl>(io, std::move(options), std::move(on_packet))) {}

RelayClient::~RelayClient() { stop(); }

void RelayClient::on_peer_gone(OnPeerGone f) { impl_->on_peer_gone = std::move(f); }

void RelayClient::start() {
  if (impl_->running) return;
  impl_->running = true;
  asio::co_spawn(impl_->io, impl_->run(), asio::detached);
}

void RelayClient::stop() {
  impl_->running = false;
  // Frames already buffered must not reach an owner that is going away.
  impl_->on_packet = nullptr;
  impl_->on_peer_gone = nullptr;
  impl_->up = false;
  impl_->retry.cancel();
  impl_->wake.cancel();
  if (impl_->stream) impl_->stream->close();
}

bool RelayClient::send(const relay::NodeKey& to, const uint8_t* data, size_t len) {
  return impl_->enqueue(relay::packet_frame(relay::FrameType::send_packet, to, data, len));
}

const std::string& RelayClient::state() const { return impl_->state; }
bool RelayClient::connected() const { return impl_->up; }

}  // namespace weft
