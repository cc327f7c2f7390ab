// Authorization of one inbound HBONE CONNECT, as ztunnel answers it:
//   400 the target is not one we serve (never an open proxy),
//   401 the peer's SPIFFE ID is denied or not allowed,
//   0   go ahead (connect to the mapped local address; 503 if that fails).
#pragma once

#include <string>

#include "config/proxy_config.h"

namespace weft {

struct ConnectVerdict {
  int status = 0;
  const InboundTargetConfig* target = nullptr;
  std::string reason;  // for the access log: unknown_target, denied_by_policy, ...
};

ConnectVerdict authorize_connect(const ProxyConfig& config, const std::string& trust_domain,
                                 const std::string& authority, const std::string& peer_spiffe_id);

}  // namespace weft
