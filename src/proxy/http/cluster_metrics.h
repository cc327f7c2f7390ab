// Prometheus metrics of the L7 clusters, read from their shared state when scraped: breaker
// occupancy and overflows, outlier ejections, endpoint health (what Envoy exports as
// cluster.<name>.upstream_rq_pending_overflow, outlier_detection.ejections_enforced_total, …).
#pragma once

#include <string>

#include "proxy/http/cluster.h"

namespace weft {

void write_cluster_metrics(const HttpRuntime& http, SteadyMillis now, std::string& out);

}  // namespace weft
