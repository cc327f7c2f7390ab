#include "relay/relay_role.h"

#include <spdlog/spdlog.h>

#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/json.hpp>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "http/http_client.h"
#include "http/http_server.h"
#include "identity/certificate_authority.h"
#include "p2p/relay_server.h"
#include "p2p/stun_server.h"

namespace weft {

namespace asio = boost::asio;
namespace json = boost::json;
namespace fs = std::filesystem;

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + p.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

// Loads (or reloads) the serving certificate into `ctx`; new connections use it.
void load_certificate(asio::ssl::context& ctx, const fs::path& dir) {
  boost::system::error_code ec;
  ctx.use_certificate_chain_file((dir / "cert.pem").string(), ec);
  if (ec)
    throw std::runtime_error("relay TLS: " + (dir / "cert.pem").string() + ": " + ec.message());
  ctx.use_private_key_file((dir / "key.pem").string(), asio::ssl::context::pem, ec);
  if (ec)
    throw std::runtime_error("relay TLS: " + (dir / "key.pem").string() + ": " + ec.message());
  if (SSL_CTX_check_private_key(ctx.native_handle()) != 1)
    throw std::runtime_error("relay TLS: key.pem does not match cert.pem in " + dir.string());
}

// Who may use the relay: the node keys of the agents control knows. The relay calls in every
// few seconds with the version it holds (an unchanged set comes back without keys) and the
// address agents should use, which control then lists to them. A key the relay has not seen
// wakes the poller early (at most once a second), so a node that just joined is let in on its
// next retry.
class Membership {
 public:
  Membership(asio::io_context& io, const RelayRoleOptions& o) : io_(io), options_(o) {
    token_ = trim(read_text(o.token_file));
    if (token_.empty()) throw std::runtime_error(o.token_file.string() + " is empty");
  }
  ~Membership() { stop(); }
  void start(std::string advertise) {
    advertise_ = std::move(advertise);
    thread_ = std::thread([this] { loop(); });
  }
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  // io thread.
  bool is_member(const relay::NodeKey& key) {
    if (keys_.count(key)) return true;
    {
      std::lock_guard lock(mutex_);
      wanted_early_ = true;
    }
    cv_.notify_all();
    return false;
  }
  bool loaded() const { return loaded_; }
  size_t size() const { return keys_.size(); }
  uint64_t failures() const { return failures_.load(); }

 private:
  void loop() {
    uint64_t version = 0;
    auto last = std::chrono::steady_clock::now() - std::chrono::hours(1);
    const std::atomic<bool>* cancel = &cancel_;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        const auto next = last + options_.members_refresh;
        cv_.wait_until(lock, next, [&] {
          return stopping_ || (wanted_early_ &&
                               std::chrono::steady_clock::now() - last >= std::chrono::seconds(1));
        });
        if (stopping_) return;
        wanted_early_ = false;
      }
      last = std::chrono::steady_clock::now();
      HttpCall call;
      call.url = options_.control_url + "/v1/relays/heartbeat";
      call.method = "POST";
      json::object body{{"version", version}};
      if (!advertise_.empty()) body["address"] = advertise_;
      call.body = json::serialize(body);
      call.bearer = token_;
      call.ca_file = options_.tls_dir / "ca.crt";
      call.cancel = cancel;
      auto res = http_call(call);
      if (!res || res->status != 200) {
        const std::string why =
            res ? "control answered " + std::to_string(res->status) + ": " + res->body
                : res.error();
        if (failures_++ == 0 || failures_ % 60 == 0)
          spdlog::warn("relay: cannot fetch members from control: {} (keeping the last set)", why);
        continue;
      }
      if (failures_.exchange(0) > 0) spdlog::info("relay: control reachable again");
      json::error_code ec;
      const auto v = json::parse(res->body, ec);
      const auto* keys = !ec && v.is_object() ? v.as_object().if_contains("node_keys") : nullptr;
      const auto* ver = !ec && v.is_object() ? v.as_object().if_contains("version") : nullptr;
      if (ver && ver->is_int64() && !keys && static_cast<uint64_t>(ver->as_int64()) == version)
        continue;  // unchanged
      if (!keys || !keys->is_array() || !ver || !ver->is_int64()) {
        spdlog::warn("relay: control's member list is malformed; keeping the last set");
        continue;
      }
      std::set<relay::NodeKey> next;
      for (const auto& k : keys->as_array()) {
        if (!k.is_string() || k.as_string().size() != 64) continue;
        relay::NodeKey key{};
        bool ok = true;
        for (size_t i = 0; i < 32 && ok; ++i) {
          unsigned byte = 0;
          ok = std::sscanf(k.as_string().c_str() + 2 * i, "%2x", &byte) == 1;
          key[i] = static_cast<uint8_t>(byte);
        }
        if (ok) next.insert(key);
      }
      version = static_cast<uint64_t>(ver->as_int64());
      spdlog::debug("relay: {} member keys (version {})", next.size(), version);
      asio::post(io_, [this, next = std::move(next)]() mutable {
        keys_ = std::move(next);
        loaded_ = true;
      });
    }
  }

  asio::io_context& io_;
  const RelayRoleOptions& options_;
  std::string token_;  // never logged
  std::string advertise_;
  std::set<relay::NodeKey> keys_;  // io thread
  bool loaded_ = false;            // io thread
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false, wanted_early_ = false;
  std::atomic<bool> cancel_{false};
  std::atomic<uint64_t> failures_{0};
};

}  // namespace

int run_relay(const RelayRoleOptions& options) {
  if (options.control_url.empty()) throw std::runtime_error("--control is required");
  asio::io_context io;
  auto tls = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_server);
  SSL_CTX_set_min_proto_version(tls->native_handle(), TLS1_3_VERSION);
  SSL_CTX_set_mode(tls->native_handle(), SSL_MODE_RELEASE_BUFFERS);
  load_certificate(*tls, options.tls_dir);

  Membership members(io, options);
  RelayOptions ro;
  ro.listen = options.listen;
  ro.rate_bytes_per_s = options.rate_bytes_per_s;
  auto relay = RelayServer::bind(io, tls, ro,
                                 [&](const relay::NodeKey& key) { return members.is_member(key); });
  if (!relay) throw std::runtime_error(relay.error() + " (set --listen)");
  std::unique_ptr<StunServer> stun;
  if (options.stun_listen) {
    auto s = StunServer::bind(io, *options.stun_listen);
    if (!s) throw std::runtime_error(s.error() + " (set --stun-listen, or 'off')");
    stun = std::move(*s);
  }
  auto admin = HttpServer::bind(io, options.admin, nullptr, [&](const HttpRequest& r) {
    if (r.path == "/ready")
      return members.loaded()
                 ? HttpResponse{200, "ready\n", "text/plain"}
                 : HttpResponse{503, "waiting for control's member list\n", "text/plain"};
    if (r.path == "/metrics") {
      std::string out = (*relay)->metrics_text();
      out +=
          "# HELP weft_relay_members Node keys control allows on this relay.\n"
          "# TYPE weft_relay_members gauge\nweft_relay_members " +
          std::to_string(members.size()) +
          "\n# HELP weft_relay_member_fetch_failures Consecutive failed member fetches.\n"
          "# TYPE weft_relay_member_fetch_failures gauge\nweft_relay_member_fetch_failures " +
          std::to_string(members.failures()) + "\n";
      if (stun)
        out +=
            "# HELP weft_stun_answered_total STUN Binding requests answered.\n"
            "# TYPE weft_stun_answered_total counter\nweft_stun_answered_total " +
            std::to_string(stun->answered()) +
            "\n# HELP weft_stun_dropped_total Datagrams on the STUN ports that were not "
            "Binding requests.\n# TYPE weft_stun_dropped_total counter\n"
            "weft_stun_dropped_total " +
            std::to_string(stun->dropped()) + "\n";
      return HttpResponse{200, out, "text/plain; version=0.0.4"};
    }
    return json_error(404, "no such endpoint: " + r.path + " (try /ready or /metrics)");
  });
  if (!admin) throw std::runtime_error("admin: " + admin.error() + " (set --admin)");

  const HostPort bound{options.listen.host, (*relay)->port()};
  if (!options.address_file.empty()) {
    const auto base = options.address_file.string();
    if (stun)
      write_file_atomic(base + ".stun",
                        HostPort{options.stun_listen->host, stun->port()}.to_string() + "\n", 0644);
    write_file_atomic(base + ".admin",
                      HostPort{options.admin.host, (*admin)->port()}.to_string() + "\n", 0644);
    write_file_atomic(options.address_file, bound.to_string() + "\n", 0644);
  }
  // Agents are told this address; with a wildcard listen the relay cannot know it.
  std::string advertise = options.advertise;
  if (advertise.empty() && options.listen.host != "0.0.0.0" && options.listen.host != "::")
    advertise = bound.to_string();
  if (advertise.empty())
    spdlog::warn(
        "relay: listening on a wildcard address and no --advertise: control will not announce "
        "this relay to agents (give --advertise host:port, or list it in control's --relay)");
  members.start(advertise);
  spdlog::info("weft relay ready on TLS {}, STUN {}, admin http://{}; members from {}",
               bound.to_string(),
               stun ? "UDP " + options.stun_listen->host + ":" + std::to_string(stun->port()) +
                          "+" + std::to_string(stun->alternate_port())
                    : std::string("off"),
               HostPort{options.admin.host, (*admin)->port()}.to_string(), options.control_url);

  asio::signal_set signals(io, SIGTERM, SIGINT, SIGHUP);
  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        if (sig == SIGHUP) {
          // Certificate rotation: new connections get the new one; live ones keep theirs.
          try {
            asio::ssl::context check(asio::ssl::context::tls_server);
            load_certificate(check, options.tls_dir);  // a broken pair must not half-replace
            load_certificate(*tls, options.tls_dir);
            spdlog::info("relay: SIGHUP: certificate reloaded from {}", options.tls_dir.string());
          } catch (const std::exception& e) {
            spdlog::error("relay: SIGHUP: {}; still serving the previous certificate", e.what());
          }
          signals.async_wait(on_signal);
          return;
        }
        spdlog::info("relay: shutting down");
        (*relay)->close();
        if (stun) stun->close();
        (*admin)->close();
        io.stop();
      };
  signals.async_wait(on_signal);
  io.run();
  members.stop();
  return 0;
}

}  // namespace weft
