#include <string_view>

#include "config/proxy_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    auto c = weft::parse_proxy_config(text, "fuzz.yaml", "/tmp");
    (void)c.to_json();
  } catch (const weft::ConfigError&) {
    // The only exception a bad config may raise.
  }
  return 0;
}
