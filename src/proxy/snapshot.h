// What a worker needs to handle a new connection: the config and the TLS material, immutable.
// The admin thread builds a new snapshot on reload or rotation and posts it to every worker;
// a connection keeps the snapshot it started with, so nothing on the data path takes a lock.
#pragma once

#include <memory>

#include "config/proxy_config.h"
#include "proxy/http/cluster.h"
#include "transport/tls/tls_contexts.h"

namespace weft {

struct ProxySnapshot {
  std::shared_ptr<const ProxyConfig> config;
  std::shared_ptr<const TlsContexts> tls;   // null when no identity is configured (L4 only)
  std::shared_ptr<const HttpRuntime> http;  // L7 clusters and rate limiters; set by publish()
};

using SnapshotPtr = std::shared_ptr<const ProxySnapshot>;

}  // namespace weft
