// Plain TCP forwarding between two sockets with splice(2): bytes move socket -> pipe -> socket
// inside the kernel and never enter user space. Each direction has its own pipe and passes a
// half-close (FIN) on once its pipe is empty.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <boost/asio/ip/tcp.hpp>

#include "stats/metrics.h"

namespace weft {

class SpliceRelay : public std::enable_shared_from_this<SpliceRelay> {
 public:
  using Finished = std::function<void(const SpliceRelay&, const std::string& result)>;

  SpliceRelay(boost::asio::ip::tcp::socket downstream, boost::asio::ip::tcp::socket upstream,
              std::shared_ptr<TcpCounters> counters, Metrics& metrics, Finished finished);
  ~SpliceRelay();

  void start();
  uint64_t bytes_received() const { return up_.bytes; }  // downstream -> upstream
  uint64_t bytes_sent() const { return down_.bytes; }    // upstream -> downstream

 private:
  struct Direction {
    boost::asio::ip::tcp::socket* from = nullptr;
    boost::asio::ip::tcp::socket* to = nullptr;
    int pipe_r = -1, pipe_w = -1;
    size_t in_pipe = 0;
    uint64_t bytes = 0;
    bool eof = false;
    bool done = false;
    bool upstream_bound = false;  // counts as received bytes
  };

  void pump(Direction& d);
  void fail(const std::string& result);
  void check_done();

  boost::asio::ip::tcp::socket downstream_;
  boost::asio::ip::tcp::socket upstream_;
  std::shared_ptr<TcpCounters> counters_;
  Metrics& metrics_;
  Finished finished_;
  Direction up_, down_;
  bool finished_called_ = false;
};

}  // namespace weft
