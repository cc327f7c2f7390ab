// host:port as it appears in config, CLI flags and HBONE :authority ("10.0.0.1:80",
// "[::1]:8080", "echo.default.svc:9000").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/result.h"

namespace weft {

struct HostPort {
  std::string host;  // without brackets for IPv6
  uint16_t port = 0;

  std::string to_string() const;
  bool operator==(const HostPort&) const = default;
};

// Strict: the host is an IPv4/IPv6 literal or a DNS name (letters, digits, '-', '.', '_'),
// and the port is 0..65535 (0 only when allow_zero_port, for listeners the OS numbers).
Result<HostPort> parse_host_port(std::string_view text, bool allow_zero_port = false);

}  // namespace weft
