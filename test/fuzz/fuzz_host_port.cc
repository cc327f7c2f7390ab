#include <string_view>

#include "core/duration.h"
#include "core/host_port.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto hp = weft::parse_host_port(text, true);
  if (hp.ok()) {
    auto again = weft::parse_host_port(hp->to_string(), true);
    if (!again.ok() || !(*again == *hp)) __builtin_trap();
  }
  (void)weft::parse_duration(text);
  return 0;
}
