// Active health checks, run by one worker for the whole process (the endpoint state they set
// is shared): per endpoint of each service with a `health_check`, every `interval` a CONNECT
// through the endpoint's proxy (tcp: the tunnel opening means the proxy reached the target),
// plus for http a GET of `path` that must answer 2xx within `timeout`. `unhealthy_threshold`
// failures in a row mark the endpoint unhealthy (balancing skips it); `healthy_threshold`
// successes bring it back.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "proxy/http/cluster.h"
#include "proxy/http/upstream_pool.h"

namespace weft {

class HealthChecker : public std::enable_shared_from_this<HealthChecker> {
 public:
  HealthChecker(boost::asio::io_context& io, UpstreamPool& pool);
  void update(std::shared_ptr<const HttpRuntime> runtime);
  void stop();

 private:
  void tick();
  void check(std::shared_ptr<const HttpRuntime> rt, const Cluster& c, int ep);
  static void report(const Cluster& c, int ep, bool ok);

  boost::asio::io_context& io_;
  UpstreamPool& pool_;
  std::shared_ptr<const HttpRuntime> runtime_;
  boost::asio::steady_timer timer_;
  std::map<std::string, SteadyMillis> next_due_;  // per service|endpoint
  std::map<std::string, bool> in_flight_;
  bool running_ = false;
};

}  // namespace weft
