// The control and agent APIs' JSON decoding: strict fields, and every registry kind's validation
// (services, endpoints, policies, resources, clusters) against hostile bodies.
#include <string_view>

#include "control/registry.h"
#include "http/json_fields.h"

namespace {

const weft::Registry& registry() {
  // One known agent, so endpoint and resource validation reaches past the agent lookup.
  static weft::Registry* r = [] {
    auto* reg = new weft::Registry("mesh.test");
    reg->apply(
        1, "agents", "a1",
        R"({"id":"a1","cluster":"east","mesh_ip":"100.64.0.1","spiffe_id":"spiffe://mesh.test/cluster/east/node/a1"})",
        "");
    return reg;
  }();
  return *r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto f = weft::JsonFields::parse(
      text, {"auth_key", "name", "cluster", "public_key", "csr", "reusable", "ttl", "allow"});
  if (f.ok()) {
    (void)f->string("auth_key");
    (void)f->boolean("reusable");
    (void)f->integer("ttl");
    (void)f->strings("allow");
  }
  for (const char* kind : weft::kRegistryKinds) {
    weft::RegistryError error;
    auto v = registry().validate(kind, "", text, error);
    if (!v.ok() && error.message.empty()) __builtin_trap();  // every refusal says why
  }
  return 0;
}
