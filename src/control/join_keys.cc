#include "control/join_keys.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <chrono>

namespace weft {

std::string random_hex(size_t bytes) {
  std::string raw(bytes, '\0');
  RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(bytes));
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string sha256_hex(const std::string& data) {
  unsigned char md[32];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += digits[md[i] >> 4];
    out += digits[md[i] & 15];
  }
  return out;
}

std::string hash_join_key(const std::string& secret) {
  return sha256_hex("weft-join-key:" + secret);
}

CreatedKey create_join_key(ControlStore& store, Millis ttl, bool reusable,
                           const std::string& cluster) {
  CreatedKey k;
  k.secret = "wjk_" + random_hex(24);
  k.record.hash = hash_join_key(k.secret);
  k.record.id = k.record.hash.substr(0, 12);
  k.record.cluster = cluster;
  k.record.reusable = reusable;
  const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  k.record.created_at = now;
  k.record.expires_at = now + ttl.count();
  store.create_join_key(k.record);
  return k;
}

}  // namespace weft
