#include "proxy/policy/connect_policy.h"

#include <algorithm>

#include "identity/spiffe_id.h"

namespace weft {

ConnectVerdict authorize_connect(const ProxyConfig& config, const std::string& trust_domain,
                                 const std::string& authority, const std::string& peer) {
  ConnectVerdict v;
  v.target = config.find_target(authority);
  if (!v.target) {
    v.status = 400;
    v.reason = "unknown_target";
    return v;
  }
  auto td = spiffe_trust_domain(peer);
  if (!td || *td != trust_domain) {
    v.status = 401;
    v.reason = "foreign_trust_domain";
    return v;
  }
  const auto listed = [&](const std::vector<std::string>& ids) {
    return std::any_of(ids.begin(), ids.end(),
                       [&](const std::string& p) { return spiffe_pattern_matches(p, peer); });
  };
  if (listed(v.target->deny) || (!v.target->allow.empty() && !listed(v.target->allow))) {
    v.status = 401;
    v.reason = "denied_by_policy";
  }
  return v;
}

}  // namespace weft
