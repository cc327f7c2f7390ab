// Join keys: shown once at creation, stored only as a SHA-256 hash.
#pragma once

#include <string>

#include "control/store.h"
#include "core/duration.h"

namespace weft {

struct CreatedKey {
  JoinKey record;
  std::string secret;  // "wjk_..." — printed once, never stored
};

CreatedKey create_join_key(ControlStore& store, Millis ttl, bool reusable,
                           const std::string& cluster);
std::string hash_join_key(const std::string& secret);
std::string sha256_hex(const std::string& data);
std::string random_hex(size_t bytes);

}  // namespace weft
