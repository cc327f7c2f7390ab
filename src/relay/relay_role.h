// `weft relay`: a relay (and STUN server) of its own, for sites where control's embedded relay
// is not enough — another region, a second relay to fail over to, or port 443 on a host that
// allows nothing else. It serves the same relay protocol as control (docs/relay-protocol.md)
// with a certificate from the mesh CA, and asks control which node keys may use it.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

#include "core/host_port.h"

namespace weft {

struct RelayRoleOptions {
  HostPort listen{"0.0.0.0", 8443};                                 // TLS relay
  std::optional<HostPort> stun_listen = HostPort{"0.0.0.0", 3478};  // nullopt: no STUN
  HostPort admin{"127.0.0.1", 15030};                               // /ready, /metrics
  std::string advertise;  // host:port agents dial; default: the listen address if specific
  // cert.pem, key.pem and ca.crt, as `weft cert issue` writes them; re-read on SIGHUP.
  std::filesystem::path tls_dir;
  std::string control_url;           // https://control:8443
  std::filesystem::path token_file;  // the operator token: control's <data-dir>/admin.token
  std::chrono::milliseconds members_refresh{5000};
  double rate_bytes_per_s = 250e6;     // per client
  std::filesystem::path address_file;  // if set: relay address here, then .stun and .admin
};

// Runs until SIGTERM or SIGINT; returns the exit code. Throws std::runtime_error when it
// cannot start (a port taken, TLS files missing), saying which.
int run_relay(const RelayRoleOptions& options);

}  // namespace weft
