#include "core/host_port.h"

#include <arpa/inet.h>

#include <charconv>

namespace weft {

std::string HostPort::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

namespace {

bool valid_dns_name(std::string_view h) {
  if (h.empty() || h.size() > 253) return false;
  size_t label = 0;
  for (char c : h) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok || ++label > 63) return false;
  }
  return label != 0 || h.size() > 1;
}

}  // namespace

Result<HostPort> parse_host_port(std::string_view text, bool allow_zero_port) {
  const auto bad = [&](const char* why) {
    return make_error("invalid address '" + std::string(text) + "': " + why +
                      " (expected host:port, like 127.0.0.1:8080 or [::1]:8080)");
  };
  HostPort out;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return bad("unterminated IPv6 literal");
    out.host = std::string(text.substr(1, close - 1));
    in6_addr a6{};
    if (inet_pton(AF_INET6, out.host.c_str(), &a6) != 1) return bad("bad IPv6 address");
    port_text = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("missing port");
    out.host = std::string(text.substr(0, colon));
    if (out.host.find(':') != std::string::npos) return bad("IPv6 literals need [brackets]");
    if (!valid_dns_name(out.host)) return bad("bad host name");
    port_text = text.substr(colon + 1);
  }
  if (port_text.empty() || port_text.size() > 5) return bad("bad port");
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc() || end != port_text.data() + port_text.size() || port > 65535)
    return bad("port must be a number from 1 to 65535");
  if (port == 0 && !allow_zero_port) return bad("port must be a number from 1 to 65535");
  out.port = static_cast<uint16_t>(port);
  return out;
}

}  // namespace weft
