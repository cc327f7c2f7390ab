// Protocol detection on a captured connection's first bytes: a TLS ClientHello gives the SNI,
// an HTTP/1.x request its method, path and Host, the HTTP/2 preface prior-knowledge HTTP/2;
// anything else is opaque TCP. Pure functions over bytes (the caller peeks them without
// consuming, under a short timeout), so they are fuzzed directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace weft::sniff {

enum class Protocol { need_more, tls, http1, http2, opaque };

struct Detected {
  Protocol protocol = Protocol::opaque;
  std::string sni;     // tls: the server_name, if the ClientHello has one
  std::string method;  // http1
  std::string target;  // http1: the request target as sent
  std::string host;    // http1: the Host header (may carry a port)
};

// The most bytes detection ever waits for: a ClientHello record, or a request head.
inline constexpr size_t kMaxPeek = 16 * 1024 + 5;

// `need_more` means the bytes so far are a prefix of something recognisable; past kMaxPeek or
// at the caller's deadline, treat it as opaque.
Detected detect(const uint8_t* data, size_t len);

const char* protocol_name(Protocol p);

}  // namespace weft::sniff
