// The explicit proxy's handshakes, as pure parsers over the bytes a client sent so far: SOCKS5
// (RFC 1928: CONNECT, no authentication or username/password per RFC 1929) and HTTP proxy
// requests (CONNECT host:port, or an absolute-URI request such as GET http://host/path). Each
// returns std::nullopt while more bytes are needed, an error that says what is wrong, or what
// was asked with how many bytes it used — the caller consumes exactly those, so anything a
// client pipelines behind the handshake stays in the socket for the tunnel.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/host_port.h"
#include "core/result.h"

namespace weft::socks5 {

inline constexpr uint8_t kNoAuth = 0x00, kUserPass = 0x02, kNoAcceptable = 0xff;

struct Greeting {
  std::vector<uint8_t> methods;
  size_t consumed = 0;
};
Result<std::optional<Greeting>> parse_greeting(const uint8_t* data, size_t len);

struct Credentials {
  std::string user, password;
  size_t consumed = 0;
};
Result<std::optional<Credentials>> parse_credentials(const uint8_t* data, size_t len);

struct Request {
  uint8_t command = 0;  // 1 CONNECT (the only one served), 2 BIND, 3 UDP ASSOCIATE
  HostPort target;
  bool by_name = false;  // ATYP 3: the client left name resolution to us (socks5h)
  size_t consumed = 0;
};
Result<std::optional<Request>> parse_request(const uint8_t* data, size_t len);

// Reply codes (RFC 1928 6).
enum Reply : uint8_t {
  succeeded = 0x00,
  general_failure = 0x01,
  not_allowed = 0x02,
  host_unreachable = 0x04,
  connection_refused = 0x05,
  command_not_supported = 0x07,
  address_type_not_supported = 0x08,
};
// A reply with a zero IPv4 bound address (clients ignore it for CONNECT).
std::array<uint8_t, 10> reply(Reply code);

}  // namespace weft::socks5

namespace weft::http_proxy {

struct Request {
  bool connect = false;  // CONNECT tunnel; otherwise an absolute-URI request forwarded as is
  HostPort target;
  std::string method;
  std::string proxy_authorization;  // the header's value, if any
  size_t head_len = 0;              // through the blank line
  // Not CONNECT: the head to send the origin instead — origin-form target ("/path?q"), the
  // hop-by-hop Proxy-* headers gone (many servers refuse the absolute form, and credentials
  // must not travel on).
  std::string origin_head;
};
// Errors carry the HTTP status to answer with ("400 ..." or "405 ...").
Result<std::optional<Request>> parse_request(std::string_view data);

}  // namespace weft::http_proxy
