#include "fuzz_targets.h"
#include "p2p/relay_frame.h"

// Hostile bytes from a relay client: the reader must refuse or frame them, never crash, and
// every frame it hands out must re-encode to the same bytes.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  weft::relay::FrameReader reader;
  // Two feeds, split in the middle, as a socket might deliver them.
  reader.feed(data, size / 2);
  for (int round = 0; round < 2; ++round) {
    for (;;) {
      auto f = reader.next();
      if (!f || !*f) break;
      const auto& frame = **f;
      const auto again =
          weft::relay::encode(frame.type, frame.payload.data(), frame.payload.size());
      if (again.size() != frame.payload.size() + 4) __builtin_trap();
      (void)weft::relay::parse_challenge(frame);
      (void)weft::relay::parse_proof(frame);
      (void)weft::relay::parse_packet(frame);
    }
    if (round == 0) reader.feed(data + size / 2, size - size / 2);
  }
  return 0;
}
