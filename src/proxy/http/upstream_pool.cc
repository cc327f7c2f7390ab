#include "proxy/http/upstream_pool.h"

#include "proxy/http/h2_upstream.h"

#include <sys/socket.h>
#include <sys/types.h>

#include <cerrno>
#include <cstring>

namespace weft {

namespace asio = boost::asio;

UpstreamPool::UpstreamPool(asio::io_context& io, Dial dial)
    : io_(io), dial_(std::move(dial)), sweep_(io) {}

UpstreamPool::~UpstreamPool() { clear(); }

const std::string& UpstreamPool::key(const Cluster& c, int endpoint) {
  return c.endpoints()[endpoint].pool_key;
}

namespace {

// Still usable: open, and nothing unread (an HTTP/1.1 server says nothing unasked, so bytes or
// EOF here mean it closed or is misbehaving).
bool still_open(UpstreamConn& c) {
  if (c.buffer.size() != 0) return false;
  if (const auto& pipe = c.socket.pipe()) return pipe->reusable();
  char byte;
  const ssize_t n = ::recv(c.socket.tcp().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

}  // namespace

std::shared_ptr<UpstreamConn> UpstreamPool::take_idle(const Cluster& c, int endpoint) {
  auto it = idle_.find(key(c, endpoint));
  if (it == idle_.end()) return nullptr;
  auto& list = it->second;
  const SteadyMillis now = steady_now_ms();
  while (!list.empty()) {
    auto conn = std::move(list.back());  // most recently used: warmest, least likely closed
    list.pop_back();
    if (now - conn->idle_since < conn->idle_timeout.count() && still_open(*conn)) {
      conn->reused = true;
      return conn;
    }
  }
  idle_.erase(it);
  return nullptr;
}

void UpstreamPool::open(const Cluster& c, int endpoint, Opened done) {
  auto conn = std::make_shared<UpstreamConn>(asio::ip::tcp::socket(io_), key(c, endpoint),
                                             c.breakers_ptr());
  conn->idle_timeout = c.service().http.idle_timeout;
  dial_(c, endpoint, std::move(conn), std::move(done));
}

void UpstreamPool::put_idle(std::shared_ptr<UpstreamConn> conn) {
  conn->idle_since = steady_now_ms();
  idle_[conn->key].push_back(std::move(conn));
  arm_sweep();
}

std::shared_ptr<H2Upstream> UpstreamPool::take_h2(const Cluster& c, int endpoint) {
  auto it = h2_.find(key(c, endpoint));
  if (it == h2_.end()) return nullptr;
  std::erase_if(it->second, [](const auto& conn) { return conn->closed(); });
  // The least busy one with room: streams spread over the connections there are.
  std::shared_ptr<H2Upstream> best;
  for (const auto& conn : it->second)
    if (conn->has_room() && (!best || conn->active_streams() < best->active_streams())) best = conn;
  if (it->second.empty()) h2_.erase(it);
  return best;
}

std::shared_ptr<H2Upstream> UpstreamPool::adopt_h2(const Cluster& c, int endpoint,
                                                   std::shared_ptr<UpstreamConn> conn, bool share) {
  return adopt_h2(key(c, endpoint), std::move(conn), share);
}

bool UpstreamPool::join_h2_connecting(const Cluster& c, int endpoint, H2Ready ready) {
  auto it = h2_connecting_.find(key(c, endpoint));
  if (it == h2_connecting_.end()) return false;
  for (auto& connecting : it->second)
    if (connecting->waiters.size() < H2Upstream::kMaxStreams) {
      connecting->waiters.push_back(std::move(ready));
      return true;
    }
  return false;
}

void UpstreamPool::open_h2(const Cluster& c, int endpoint, bool share, H2Ready ready) {
  const std::string& k = key(c, endpoint);
  auto connecting = std::make_shared<H2Connecting>();
  connecting->waiters.push_back(std::move(ready));
  share = share && !cleared_;
  if (share) h2_connecting_[k].push_back(connecting);
  open(
      c, endpoint,
      [this, k, connecting, share](std::shared_ptr<UpstreamConn> conn, const std::string& failure) {
        if (share) {
          auto it = h2_connecting_.find(k);
          if (it != h2_connecting_.end()) {
            std::erase(it->second, connecting);
            if (it->second.empty()) h2_connecting_.erase(it);
          }
        }
        // Shared from now on, whether or not the streams that waited still want it.
        auto up =
            conn && failure.empty() ? adopt_h2(k, std::move(conn), share && !cleared_) : nullptr;
        const std::string why = up ? "" : failure.empty() ? "the connection failed" : failure;
        for (auto& waiter : std::exchange(connecting->waiters, {})) waiter(up, why);
      });
}

std::shared_ptr<H2Upstream> UpstreamPool::adopt_h2(const std::string& key,
                                                   std::shared_ptr<UpstreamConn> conn, bool share) {
  auto up = std::make_shared<H2Upstream>(io_, std::move(conn));
  up->start();
  if (!share) return up;
  auto& list = h2_[key];
  std::erase_if(list, [](const auto& x) { return x->closed(); });
  list.push_back(up);
  arm_sweep();
  return up;
}

void UpstreamPool::arm_sweep() {
  if (sweeping_) return;
  sweeping_ = true;
  sweep_.expires_after(std::chrono::seconds(1));
  sweep_.async_wait([this](const boost::system::error_code& ec) {
    sweeping_ = false;
    if (ec) return;
    const SteadyMillis now = steady_now_ms();
    for (auto it = idle_.begin(); it != idle_.end();) {
      std::erase_if(it->second, [now](const std::shared_ptr<UpstreamConn>& c) {
        return now - c->idle_since >= c->idle_timeout.count();
      });
      it = it->second.empty() ? idle_.erase(it) : std::next(it);
    }
    for (auto it = h2_.begin(); it != h2_.end();) {
      std::erase_if(it->second, [](const auto& c) { return c->closed(); });
      it = it->second.empty() ? h2_.erase(it) : std::next(it);
    }
    if (!idle_.empty() || !h2_.empty()) arm_sweep();
  });
}

void UpstreamPool::clear() {
  cleared_ = true;
  h2_connecting_.clear();  // (their waiters still get the connection; nobody new joins)
  idle_.clear();
  for (auto& [key, list] : h2_)
    for (auto& conn : list) conn->retire();
  h2_.clear();
  sweep_.cancel();
}

}  // namespace weft
