// Watch fan-out for `weft control`: fills the registry with ENDPOINTS endpoints spread over the
// registered agents (one keep-alive HTTPS connection, as an operator's tooling would), parks
// WATCHERS long polls (one TLS connection each, on behalf of distinct agents), then makes
// ROUNDS changes that concern every watcher and measures, per change, the time until each
// watcher has its answer. Prints JSON: endpoints/s written, fan-out p50/p99/max.
// Usage: watch_fanout HOST PORT CA_FILE TOKEN WATCHERS ENDPOINTS ROUNDS
#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using Stream = beast::ssl_stream<beast::tcp_stream>;

struct Target {
  std::string host;
  std::string port;
  std::string token;
};

// A blocking keep-alive client for the writes.
class Client {
 public:
  Client(asio::io_context& io, asio::ssl::context& ctx, const Target& t) : t_(t), s_(io, ctx) {
    tcp::resolver r(io);
    beast::get_lowest_layer(s_).connect(r.resolve(t.host, t.port));
    s_.handshake(asio::ssl::stream_base::client);
  }
  json::value call(http::verb verb, const std::string& path, const std::string& body = "") {
    http::request<http::string_body> req{verb, path, 11};
    req.set(http::field::host, t_.host);
    req.set(http::field::authorization, "Bearer " + t_.token);
    req.keep_alive(true);
    req.body() = body;
    req.prepare_payload();
    http::write(s_, req);
    http::response_parser<http::string_body> p;
    p.body_limit(256 << 20);
    http::read(s_, buf_, p);
    if (p.get().result_int() >= 300)
      throw std::runtime_error(path + ": " + std::to_string(p.get().result_int()) + " " +
                               p.get().body());
    return json::parse(p.get().body());
  }

 private:
  Target t_;
  Stream s_;
  beast::flat_buffer buf_;
};

// One agent's long poll, resumed after every answer.
class Watcher : public std::enable_shared_from_this<Watcher> {
 public:
  Watcher(asio::io_context& io, asio::ssl::context& ctx, const Target& t, std::string agent)
      : t_(t), s_(io, ctx), agent_(std::move(agent)) {}
  void start(const tcp::resolver::results_type& at) {
    beast::get_lowest_layer(s_).async_connect(at, [self = shared_from_this()](auto ec, auto) {
      if (ec) return self->fail("connect", ec);
      self->s_.async_handshake(asio::ssl::stream_base::client, [self](auto ec) {
        if (ec) return self->fail("handshake", ec);
        self->poll();
      });
    });
  }
  // Written on the io thread; `answers` is published last, so a reader that sees it sees the rest.
  int64_t revision = -1;
  Clock::time_point answered{};
  std::atomic<int> answers{0};
  bool ready() const { return answers.load() > 0; }

 private:
  void fail(const char* what, beast::error_code ec) {
    std::fprintf(stderr, "watcher %s: %s: %s\n", agent_.c_str(), what, ec.message().c_str());
  }
  void poll() {
    std::string path = "/v1/watch?agent=" + agent_ + "&timeout=5m";
    if (revision >= 0) path += "&since=" + std::to_string(revision);
    req_ = {http::verb::get, path, 11};
    req_.set(http::field::host, t_.host);
    req_.set(http::field::authorization, "Bearer " + t_.token);
    req_.keep_alive(true);
    http::async_write(s_, req_, [self = shared_from_this()](auto ec, size_t) {
      if (ec) return self->fail("write", ec);
      self->res_.emplace();
      self->res_->body_limit(64 << 20);
      http::async_read(self->s_, self->buf_, *self->res_, [self](auto ec, size_t) {
        if (ec) return self->fail("read", ec);
        self->answered = Clock::now();
        self->revision = json::parse(self->res_->get().body()).at("revision").as_int64();
        self->answers.fetch_add(1);
        self->poll();
      });
    });
  }

  Target t_;
  Stream s_;
  std::string agent_;
  http::request<http::empty_body> req_;
  std::optional<http::response_parser<http::string_body>> res_;
  beast::flat_buffer buf_;
};

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s HOST PORT CA TOKEN WATCHERS ENDPOINTS ROUNDS\n", argv[0]);
    return 2;
  }
  const Target t{argv[1], argv[2], argv[4]};
  const int watchers = std::stoi(argv[5]), endpoints = std::stoi(argv[6]),
            rounds = std::stoi(argv[7]);
  asio::io_context io;
  asio::ssl::context ctx(asio::ssl::context::tls_client);
  ctx.load_verify_file(argv[3]);
  ctx.set_verify_mode(asio::ssl::verify_peer);

  Client admin(io, ctx, t);
  std::vector<std::string> agents;
  const auto listed = admin.call(http::verb::get, "/v1/agents");
  for (const auto& a : listed.at("agents").as_array()) agents.emplace_back(a.at("id").as_string());
  if (agents.empty() || static_cast<int>(agents.size()) < watchers) {
    std::fprintf(stderr, "need at least %d registered agents, have %zu\n", watchers, agents.size());
    return 1;
  }
  // Endpoints: ten per service, round-robin over the agents.
  const auto fill_start = Clock::now();
  for (int i = 0; i < endpoints; ++i)
    admin.call(
        http::verb::put, "/v1/endpoints/ep-" + std::to_string(i),
        json::serialize(json::object{{"service", "svc-" + std::to_string(i / 10)},
                                     {"agent_id", agents[static_cast<size_t>(i) % agents.size()]},
                                     {"port", 8000 + i % 1000}}));
  const double fill_s = std::chrono::duration<double>(Clock::now() - fill_start).count();
  // Every identity may reach "hot": each change to it concerns every watcher.
  admin.call(http::verb::put, "/v1/policies/hot", R"({"service":"hot","allow":["*"]})");

  tcp::resolver resolver(io);
  const auto at = resolver.resolve(t.host, t.port);
  std::vector<std::shared_ptr<Watcher>> ws;
  for (int i = 0; i < watchers; ++i) {
    ws.push_back(std::make_shared<Watcher>(io, ctx, t, agents[static_cast<size_t>(i)]));
    ws.back()->start(at);
  }
  std::thread loop([&] {
    auto guard = asio::make_work_guard(io);
    io.run();
  });
  const auto all = [&](auto pred) {
    for (const auto& w : ws)
      if (!pred(*w)) return false;
    return true;
  };
  while (!all([](const Watcher& w) { return w.ready(); }))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));

  std::vector<double> latencies;
  for (int r = 0; r < rounds; ++r) {
    std::vector<int> before;
    for (const auto& w : ws) before.push_back(w->answers);
    const auto t0 = Clock::now();
    admin.call(http::verb::put, "/v1/endpoints/hot-1",
               json::serialize(json::object{
                   {"service", "hot"}, {"agent_id", agents.back()}, {"port", 9000 + r}}));
    for (size_t k = 0; k < ws.size(); ++k)
      while (ws[k]->answers.load() <= before[k])
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (const auto& w : ws)
      latencies.push_back(std::chrono::duration<double, std::milli>(w->answered - t0).count());
  }
  std::printf(
      "{\"watchers\": %d, \"endpoints\": %d, \"endpoints_per_second\": %.0f, \"rounds\": %d, "
      "\"fanout_p50_ms\": %.1f, \"fanout_p99_ms\": %.1f, \"fanout_max_ms\": %.1f}\n",
      watchers, endpoints, endpoints / fill_s, rounds, percentile(latencies, 0.5),
      percentile(latencies, 0.99), percentile(latencies, 1.0));
  std::fflush(stdout);
  std::_Exit(0);  // the watchers' connections close with the process
}
