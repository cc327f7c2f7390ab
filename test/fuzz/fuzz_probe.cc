#include <openssl/evp.h>

#include "fuzz_targets.h"
#include "p2p/probe.h"

// Hostile datagrams that look like path probes: parse must never crash, must refuse anything
// not signed by the key it names, and what it accepts must re-encode to the same bytes when we
// sign it ourselves with that key (only possible for our own key, so: accepted probes are
// pings and pongs of kSize bytes (pings padded up to kFullDatagram), or calls-me-maybe whose size
// matches their count).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)weft::probe::looks_like_probe(data, size);
  auto p = weft::probe::parse(data, size);
  if (!p) return 0;
  using weft::probe::Type;
  if (p->type == Type::call_me_maybe) {
    if (p->offered.size() > weft::probe::kMaxOffered || size != 54 + 19 * p->offered.size() + 64 ||
        p->observed)
      __builtin_trap();
  } else if (size < weft::probe::kSize || (p->type != Type::ping && p->type != Type::pong) ||
             (size > weft::probe::kSize &&
              (p->type != Type::ping || size > weft::probe::kFullDatagram)) ||
             !p->offered.empty()) {
    __builtin_trap();
  }
  return 0;
}
