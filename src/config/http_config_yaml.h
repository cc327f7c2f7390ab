// Reading the L7 parts of the proxy config (see http_config.h) with the strict YAML reader.
#pragma once

#include <string>
#include <vector>

#include "config/http_config.h"
#include "config/yaml_reader.h"

namespace weft {

std::vector<RouteConfig> read_routes(const Reader& r, const YAML::Node& list,
                                     const std::string& field);
HttpServiceConfig read_http_service(const Reader& r, const YAML::Node& map,
                                    const std::string& field);
HmacVerifyConfig read_hmac_verify(const Reader& r, const YAML::Node& map, const std::string& field);
std::vector<AuthzRule> read_authz(const Reader& r, const YAML::Node& list,
                                  const std::string& field);
RateLimitPolicy read_rate_limit(const Reader& r, const YAML::Node& n, const std::string& f);
std::vector<EndpointConfig> read_endpoints(const Reader& r, const YAML::Node& list,
                                           const std::string& field);

}  // namespace weft
