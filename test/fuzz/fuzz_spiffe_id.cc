#include <string_view>

#include "identity/spiffe_id.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto id = weft::parse_spiffe_id(text);
  // Round trip: whatever parses must print back to exactly the input.
  if (id.ok() && id->to_string() != text) __builtin_trap();
  (void)weft::spiffe_trust_domain(text);
  return 0;
}
