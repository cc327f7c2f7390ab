#include <cctype>

#include "fuzz_targets.h"
#include "proxy/capture/sniff.h"

// Hostile first bytes of a captured connection: detection never crashes, never reads past the
// input, and what it extracts is clean (an SNI of hostname characters, a method of letters).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto d = weft::sniff::detect(data, size);
  for (char c : d.sni)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_')
      __builtin_trap();
  if (d.protocol == weft::sniff::Protocol::http1 && (d.method.empty() || d.target.empty()))
    __builtin_trap();
  for (char c : d.method)
    if (!std::isupper(static_cast<unsigned char>(c)) && c != '-' && c != '_') __builtin_trap();
  return 0;
}
