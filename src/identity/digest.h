// SHA-256 and HMAC-SHA256 as lower-case hex (OpenSSL).
#pragma once

#include <string>
#include <string_view>

namespace weft {

std::string sha256_hex(std::string_view data);
std::string hmac_sha256_hex(std::string_view key, std::string_view data);

// SHA-256 of data that arrives in pieces (a streamed request body).
class Sha256Stream {
 public:
  Sha256Stream();
  ~Sha256Stream();
  Sha256Stream(const Sha256Stream&) = delete;
  Sha256Stream& operator=(const Sha256Stream&) = delete;
  void update(std::string_view data);
  // The digest of everything so far as lower-case hex; the hasher starts over afterwards.
  std::string finish_hex();

 private:
  struct Ctx;
  Ctx* ctx_;
};

}  // namespace weft
