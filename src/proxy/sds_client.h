// The sidecar's side of the agent's SDS socket: fetch the workload certificate named in the
// config, and wait for its rotation with a long poll. Blocking; the proxy runs it off the admin
// thread.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "config/proxy_config.h"
#include "core/duration.h"
#include "core/result.h"
#include "transport/tls/tls_contexts.h"

namespace weft {

struct SdsIdentity {
  IdentityMaterial material;
  std::string serial;  // changes when the agent has rotated the certificate
};

// `known_serial` empty: answer at once. Otherwise the agent answers when the certificate's
// serial differs from it, or after `wait` with the current one.
// `status`, if given, receives the agent's HTTP status (0 when it could not be reached): a 4xx
// is a refusal to report, not a failure to retry.
Result<SdsIdentity> fetch_sds_identity(const IdentityConfig& identity,
                                       const std::string& known_serial, Millis wait,
                                       const std::atomic<bool>* cancel = nullptr,
                                       int* status = nullptr);

struct SdsServices {
  std::vector<ServiceConfig> services;
  std::string revision;
};

// The mesh services the agent's view reaches. `known_revision` set: a long poll, as above.
Result<SdsServices> fetch_sds_services(const IdentityConfig& identity,
                                       const std::string& known_revision, Millis wait,
                                       const std::atomic<bool>* cancel = nullptr);

// The HMAC request-signing key of a workload pair, from the agent (which asks control), and
// the one before control's last rotation (empty if none), which verifiers still accept.
struct SdsPairKey {
  std::string key, previous;
  bool sign_with_previous = false;  // just after a rotation: sign with `previous` still
  const std::string& signing_key() const {
    return sign_with_previous && !previous.empty() ? previous : key;
  }
  bool operator==(const SdsPairKey&) const = default;
};
Result<SdsPairKey> fetch_sds_pair_key(const IdentityConfig& identity, const std::string& source,
                                      const std::string& destination);

}  // namespace weft
