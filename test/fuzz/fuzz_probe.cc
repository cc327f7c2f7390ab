#include <openssl/evp.h>

#include "fuzz_targets.h"
#include "p2p/probe.h"

// Hostile datagrams that look like path probes: parse must never crash, must refuse anything
// not signed by the key it names, and what it accepts must re-encode to the same bytes when we
// sign it ourselves with that key (only possible for our own key, so: accepted probes are
// exactly kSize bytes with a valid type).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)weft::probe::looks_like_probe(data, size);
  auto p = weft::probe::parse(data, size);
  if (!p) return 0;
  if (size != weft::probe::kSize ||
      (p->type != weft::probe::Type::ping && p->type != weft::probe::Type::pong))
    __builtin_trap();
  return 0;
}
