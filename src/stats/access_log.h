// One JSON line per connection, written when it ends: who, where, how long, how many bytes and
// how it ended ("result"), so a refused or failed connection is always explained.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace spdlog {
class logger;
}

namespace weft {

struct AccessLogEntry {
  std::string direction;  // outbound, inbound, l4
  std::string listener;
  std::string downstream;     // client address
  std::string peer_identity;  // SPIFFE ID of the peer proxy, if any
  std::string local_identity;
  std::string upstream;       // address or service we forwarded to
  std::string authority;      // HBONE target
  std::string destination;    // captured: original destination or requested host:port
  std::string protocol;       // captured: tls, http/1.1, h2c, tcp, socks5, http-connect, ...
  std::string result = "ok";  // ok, or why it ended
  // L7: one entry per request.
  std::string method, path, host, route, trace_id, response_flags;
  unsigned status = 0;
  unsigned attempts = 0;
  std::chrono::system_clock::time_point start = std::chrono::system_clock::now();
  uint64_t bytes_received = 0;  // from downstream
  uint64_t bytes_sent = 0;      // to downstream
};

class AccessLog {
 public:
  // target: "stdout", "off", or a file path (appended).
  explicit AccessLog(const std::string& target);
  void write(const AccessLogEntry& entry);

 private:
  std::shared_ptr<spdlog::logger> logger_;
};

}  // namespace weft
