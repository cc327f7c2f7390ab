// SHA-256 and HMAC-SHA256 as lower-case hex (OpenSSL).
#pragma once

#include <string>
#include <string_view>

namespace weft {

std::string sha256_hex(std::string_view data);
std::string hmac_sha256_hex(std::string_view key, std::string_view data);

}  // namespace weft
