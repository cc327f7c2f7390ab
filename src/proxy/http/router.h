// Route matching: the first route of a listener whose host, path, method and headers all match.
#pragma once

#include <string_view>
#include <vector>

#include "config/http_config.h"

namespace weft {

struct RequestView {
  std::string_view host;  // lower case, without port
  std::string_view path;  // without the query
  std::string_view method;
  // Header lookup by lower-case name; returns false when absent.
  bool (*header)(const void* ctx, std::string_view name, std::string_view& value) = nullptr;
  const void* ctx = nullptr;
};

const RouteConfig* match_route(const std::vector<RouteConfig>& routes, const RequestView& req);

// The backend of a weighted split for a random number.
const WeightedBackend& pick_backend(const RouteConfig& route, uint64_t random);

// "Host: Example.COM:8080" -> "example.com"; brackets of an IPv6 literal are kept.
std::string normalize_host(std::string_view host_header);

}  // namespace weft
