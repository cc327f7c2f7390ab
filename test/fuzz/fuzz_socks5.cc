#include "fuzz_targets.h"
#include "proxy/capture/explicit_proxy.h"

// A hostile SOCKS5 client: each stage's parser either waits, refuses, or claims no more bytes
// than it was given; a request always names a valid host and a non-zero port.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace weft::socks5;
  if (auto g = parse_greeting(data, size); g && *g && (*g)->consumed > size) __builtin_trap();
  if (auto c = parse_credentials(data, size); c && *c && (*c)->consumed > size) __builtin_trap();
  if (auto r = parse_request(data, size); r && *r) {
    if ((*r)->consumed > size || (*r)->target.port == 0 || (*r)->target.host.empty())
      __builtin_trap();
  }
  return 0;
}
