// Open-loop HTTP/1.1 load at a fixed request rate, for latency percentiles that mean something.
//
// wrk is closed-loop: a slow response delays the next request, so a stall is counted once
// however many requests it held up ("coordinated omission"), and its p99 at one connection
// mostly measures scheduling noise. Here request i is due at start + i / RATE whatever happened
// before; it goes out on the first idle keep-alive connection, and its latency runs from when it
// was due, so time spent queued behind a slow response is counted (as wrk2 does). Debian has no
// wrk2, hence this.
//
// Usage: fixed_rate HOST PORT RATE CONNECTIONS SECONDS
// Prints JSON: requests due and completed, errors, and latency p50/p90/p99/p99.9/max in ms.
#include <algorithm>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

struct Totals {
  std::vector<uint32_t> latency_us;
  uint64_t due = 0;
  uint64_t errors = 0;
  std::deque<Clock::time_point> waiting;  // due times of requests no connection has taken yet
  Clock::time_point measure_from;         // requests due earlier are the warm-up
};

// The byte count of a complete response at the front of `buf`, 0 if more bytes are needed, -1
// when it cannot be framed (no Content-Length: the origin here always sends one).
long complete_response(std::string_view buf, int* status) {
  auto head_end = buf.find("\r\n\r\n");
  if (head_end == std::string_view::npos) return 0;
  if (buf.size() < 12 || buf.substr(0, 5) != "HTTP/") return -1;
  *status = std::atoi(std::string(buf.substr(9, 3)).c_str());
  std::string head(buf.substr(0, head_end));
  std::transform(head.begin(), head.end(), head.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  auto cl = head.find("\r\ncontent-length:");
  if (cl == std::string::npos) return -1;
  long body = std::atol(head.c_str() + cl + 17);
  long total = static_cast<long>(head_end) + 4 + body;
  return static_cast<long>(buf.size()) >= total ? total : 0;
}

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(asio::io_context& io, Totals& totals, std::string request)
      : socket_(io), totals_(totals), request_(std::move(request)) {}

  tcp::socket& socket() { return socket_; }
  bool idle() const { return idle_ && !broken_; }

  void send(Clock::time_point due) {
    idle_ = false;
    due_ = due;
    asio::async_write(socket_, asio::buffer(request_),
                      [self = shared_from_this()](boost::system::error_code ec, size_t) {
                        if (ec) return self->fail();
                        self->read();
                      });
  }

 private:
  void read() {
    socket_.async_read_some(asio::buffer(chunk_),
                            [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                              if (ec) return self->fail();
                              self->buf_.append(self->chunk_, n);
                              int status = 0;
                              long used = complete_response(self->buf_, &status);
                              if (used < 0) return self->fail();
                              if (used == 0) return self->read();
                              self->buf_.erase(0, static_cast<size_t>(used));
                              self->finish(status == 200);
                            });
  }

  void finish(bool ok) {
    if (due_ >= totals_.measure_from) {
      if (ok) {
        auto us =
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - due_).count();
        totals_.latency_us.push_back(static_cast<uint32_t>(us));
      } else {
        ++totals_.errors;
      }
    }
    idle_ = true;
    if (!totals_.waiting.empty()) {
      auto next = totals_.waiting.front();
      totals_.waiting.pop_front();
      send(next);
    }
  }

  void fail() {
    if (!broken_ && due_ >= totals_.measure_from) ++totals_.errors;
    broken_ = true;
  }

  tcp::socket socket_;
  Totals& totals_;
  std::string request_;
  std::string buf_;
  char chunk_[16384];
  Clock::time_point due_;
  bool idle_ = true;
  bool broken_ = false;
};

double percentile(const std::vector<uint32_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  size_t i =
      std::min(sorted.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted.size())));
  return sorted[i] / 1000.0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s HOST PORT RATE CONNECTIONS SECONDS\n", argv[0]);
    return 2;
  }
  const std::string host = argv[1];
  const double rate = std::atof(argv[3]);
  const int conns = std::atoi(argv[4]);
  const double seconds = std::atof(argv[5]);
  if (rate <= 0 || conns <= 0 || seconds <= 0) {
    std::fprintf(stderr, "RATE, CONNECTIONS and SECONDS must be positive\n");
    return 2;
  }
  asio::io_context io;
  Totals totals;
  totals.latency_us.reserve(static_cast<size_t>(rate * seconds * 1.1));
  const std::string request =
      "GET / HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: weft-fixed-rate\r\n\r\n";
  std::vector<std::shared_ptr<Connection>> pool;
  tcp::resolver resolver(io);
  auto endpoints = resolver.resolve(host, argv[2]);
  for (int i = 0; i < conns; ++i) {
    auto c = std::make_shared<Connection>(io, totals, request);
    asio::connect(c->socket(), endpoints);
    c->socket().set_option(tcp::no_delay(true));
    pool.push_back(std::move(c));
  }

  // One second of warm-up (TLS sessions, pools, caches), then the measured span.
  const auto period =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate));
  const auto start = Clock::now();
  const auto measure_from = totals.measure_from = start + std::chrono::seconds(1);
  const auto end = measure_from + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(seconds));
  auto next_due = start;
  asio::steady_timer timer(io);
  std::function<void()> tick = [&] {
    auto now = Clock::now();
    for (; next_due <= now && next_due < end; next_due += period) {
      if (next_due >= measure_from) ++totals.due;
      totals.waiting.push_back(next_due);
    }
    for (auto& c : pool) {
      if (totals.waiting.empty()) break;
      if (!c->idle()) continue;
      auto due = totals.waiting.front();
      totals.waiting.pop_front();
      c->send(due);
    }
    if (next_due >= end) return;
    timer.expires_at(next_due);
    timer.async_wait([&](boost::system::error_code ec) {
      if (!ec) tick();
    });
  };
  tick();
  // Requests due near the end get up to 2 s to finish; whatever has not is counted as an error.
  io.run_until(end + std::chrono::seconds(2));
  auto& lat = totals.latency_us;
  std::sort(lat.begin(), lat.end());
  uint64_t unfinished = totals.due - std::min<uint64_t>(totals.due, lat.size() + totals.errors);
  std::printf(
      "{\"rate\": %.0f, \"connections\": %d, \"due\": %llu, \"completed\": %zu, \"errors\": %llu, "
      "\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": "
      "%.3f}\n",
      rate, conns, static_cast<unsigned long long>(totals.due), lat.size(),
      static_cast<unsigned long long>(totals.errors + unfinished), percentile(lat, 0.50),
      percentile(lat, 0.90), percentile(lat, 0.99), percentile(lat, 0.999),
      lat.empty() ? 0.0 : lat.back() / 1000.0);
  return totals.errors + unfinished ? 1 : 0;
}
