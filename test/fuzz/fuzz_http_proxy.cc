#include <string_view>

#include "fuzz_targets.h"
#include "proxy/capture/explicit_proxy.h"

// A hostile HTTP proxy client: the parser waits, refuses with a status, or accepts a request
// whose head lies inside the input, with a real target, and (not CONNECT) a rewritten head
// that carries no Proxy-* header and ends with a blank line.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  auto r = weft::http_proxy::parse_request(in);
  if (!r) {
    if (r.error().size() < 4 || r.error()[3] != ' ') __builtin_trap();  // "NNN reason"
    return 0;
  }
  if (!*r) return 0;
  const auto& q = **r;
  if (q.head_len > size || q.target.port == 0 || q.target.host.empty()) __builtin_trap();
  if (!q.connect) {
    if (q.origin_head.size() < 4 || q.origin_head.compare(q.origin_head.size() - 4, 4, "\r\n\r\n"))
      __builtin_trap();
    std::string lower(q.origin_head);
    for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower.find("\r\nproxy-") != std::string::npos) __builtin_trap();
  }
  return 0;
}
