#include "proxy/l4/splice_relay.h"

#include <fcntl.h>
#include <unistd.h>

#include <tuple>
#include <vector>

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

constexpr size_t kSpliceChunk = 1 << 20;

// Pipes are taken only while bytes are in flight and returned empty, so an idle connection
// holds two sockets and no pipe (4 more descriptors each would cap a proxy at a few thousand
// idle connections). Per worker thread, like every connection.
struct PipePool {
  std::vector<std::pair<int, int>> free;
  ~PipePool() {
    for (auto [r, w] : free) {
      ::close(r);
      ::close(w);
    }
  }
  static PipePool& local() {
    thread_local PipePool pool;
    return pool;
  }
  bool take(int& r, int& w) {
    if (!free.empty()) {
      std::tie(r, w) = free.back();
      free.pop_back();
      return true;
    }
    int fds[2];
    if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return false;
    // A bigger pipe moves more per splice call; pages are only used while bytes are in it.
    ::fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
    r = fds[0];
    w = fds[1];
    return true;
  }
  void give_back(int& r, int& w) {
    if (r < 0) return;
    if (free.size() < 64) {
      free.emplace_back(r, w);
    } else {
      ::close(r);
      ::close(w);
    }
    r = w = -1;
  }
};

}  // namespace

SpliceRelay::SpliceRelay(tcp::socket downstream, tcp::socket upstream,
                         std::shared_ptr<TcpCounters> counters, Metrics& metrics, Finished finished)
    : downstream_(std::move(downstream)),
      upstream_(std::move(upstream)),
      counters_(std::move(counters)),
      metrics_(metrics),
      finished_(std::move(finished)) {
  metrics_.downstream_connections_active.inc();
  if (counters_) counters_->opened.fetch_add(1, std::memory_order_relaxed);
  up_.from = &downstream_;
  up_.to = &upstream_;
  up_.upstream_bound = true;
  down_.from = &upstream_;
  down_.to = &downstream_;
}

SpliceRelay::~SpliceRelay() {
  for (Direction* d : {&up_, &down_}) {
    if (d->in_pipe == 0) {
      PipePool::local().give_back(d->pipe_r, d->pipe_w);
    } else {  // bytes left in it: not reusable
      ::close(d->pipe_r);
      ::close(d->pipe_w);
    }
  }
  metrics_.downstream_connections_active.dec();
  if (counters_) counters_->closed.fetch_add(1, std::memory_order_relaxed);
}

void SpliceRelay::start() {
  boost::system::error_code ignored;
  downstream_.non_blocking(true, ignored);
  upstream_.non_blocking(true, ignored);
  for (Direction* d : {&up_, &down_}) {
    d->from->async_wait(tcp::socket::wait_read,
                        [self = shared_from_this(), d](const boost::system::error_code& ec) {
                          if (ec) return self->fail("read_wait_error");
                          self->pump(*d);
                        });
  }
}

void SpliceRelay::pump(Direction& d) {
  if (d.done || finished_called_) return;
  if (d.pipe_r < 0 && !PipePool::local().take(d.pipe_r, d.pipe_w)) return fail("pipe_failed");
  const int from = d.from->native_handle();
  const int to = d.to->native_handle();
  for (;;) {
    if (d.in_pipe > 0) {
      const ssize_t n =
          ::splice(d.pipe_r, nullptr, to, nullptr, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        d.in_pipe -= static_cast<size_t>(n);
        d.bytes += static_cast<uint64_t>(n);
        if (counters_) {
          auto& c = d.upstream_bound ? counters_->received_bytes : counters_->sent_bytes;
          c.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        d.to->async_wait(tcp::socket::wait_write,
                         [self = shared_from_this(), &d](const boost::system::error_code& ec) {
                           if (ec) return self->fail("write_wait_error");
                           self->pump(d);
                         });
        return;
      }
      return fail(d.upstream_bound ? "upstream_write_error" : "downstream_write_error");
    }
    if (d.eof) {
      boost::system::error_code ignored;
      d.to->shutdown(tcp::socket::shutdown_send, ignored);
      d.done = true;
      return check_done();
    }
    const ssize_t n =
        ::splice(from, nullptr, d.pipe_w, nullptr, kSpliceChunk, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      d.in_pipe += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      d.eof = true;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      PipePool::local().give_back(d.pipe_r, d.pipe_w);  // empty here: idle costs no pipe
      d.from->async_wait(tcp::socket::wait_read,
                         [self = shared_from_this(), &d](const boost::system::error_code& ec) {
                           if (ec) return self->fail("read_wait_error");
                           self->pump(d);
                         });
      return;
    }
    return fail(d.upstream_bound ? "downstream_reset" : "upstream_reset");
  }
}

void SpliceRelay::check_done() {
  if (up_.done && down_.done) fail("ok");
}

void SpliceRelay::fail(const std::string& result) {
  if (finished_called_) return;
  finished_called_ = true;
  boost::system::error_code ignored;
  downstream_.close(ignored);
  upstream_.close(ignored);
  if (finished_) {
    auto f = std::move(finished_);
    f(*this, result);
  }
}

}  // namespace weft
