#include <string_view>

#include "http/json_fields.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto f = weft::JsonFields::parse(
      text, {"auth_key", "name", "cluster", "public_key", "csr", "reusable", "ttl"});
  if (f.ok()) {
    (void)f->string("auth_key");
    (void)f->boolean("reusable");
    (void)f->integer("ttl");
  }
  return 0;
}
