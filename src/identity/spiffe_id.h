// SPIFFE IDs as Istio accepts them. Workloads: spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
// Nodes (issued by control): spiffe://<trust-domain>/cluster/<cluster>/node/<id>.
#pragma once

#include <string>
#include <string_view>

#include "core/result.h"

namespace weft {

struct SpiffeId {
  std::string trust_domain;
  std::string ns;
  std::string service_account;

  std::string to_string() const {
    return "spiffe://" + trust_domain + "/ns/" + ns + "/sa/" + service_account;
  }
  bool operator==(const SpiffeId&) const = default;
};

inline constexpr std::string_view kSpiffeIdForm =
    "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

// Strict parse: no missing segment, no trailing slash, no query or fragment, lowercase trust
// domain of [a-z0-9.-_], path segments of [A-Za-z0-9.-_]. Errors show the expected form.
Result<SpiffeId> parse_spiffe_id(std::string_view text);

// A trust domain on its own, as given to `weft ca init --trust-domain`.
Result<std::string> parse_trust_domain(std::string_view text);

// The trust domain of any spiffe:// URI (workload or node), or an error.
Result<std::string> spiffe_trust_domain(std::string_view uri);

// A peer identity a proxy may be told to expect: a workload ID or a node ID.
Result<bool> check_mesh_identity(std::string_view text);

// An authorization pattern: a workload or node ID, a prefix ending in "/*"
// (spiffe://td/cluster/east/*), or "*" for any identity of the trust domain.
Result<bool> check_identity_pattern(std::string_view text);
bool spiffe_pattern_matches(std::string_view pattern, std::string_view id);

}  // namespace weft
