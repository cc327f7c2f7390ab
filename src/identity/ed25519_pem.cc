#include "identity/ed25519_pem.h"

#include <cstring>
#include <string>
#include <vector>

namespace weft {

namespace {

constexpr std::string_view kBegin = "-----BEGIN PUBLIC KEY-----";
constexpr std::string_view kEnd = "-----END PUBLIC KEY-----";
// SEQUENCE { SEQUENCE { OID 1.3.101.112 (id-Ed25519) } BIT STRING (33 bytes, 0 unused bits) }
constexpr uint8_t kSpkiHeader[] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03,
                                   0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};
constexpr size_t kSpkiSize = sizeof kSpkiHeader + 32;

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

Result<Ed25519PublicKey> ed25519_public_from_pem(std::string_view pem) {
  const size_t begin = pem.find(kBegin);
  if (begin == std::string_view::npos)
    return make_error("not a PEM public key: no '" + std::string(kBegin) + "' line");
  const size_t body = begin + kBegin.size();
  const size_t end = pem.find(kEnd, body);
  if (end == std::string_view::npos)
    return make_error("PEM public key: no '" + std::string(kEnd) + "' line");

  // Base64 with any line breaks; '=' only as the final padding.
  std::vector<uint8_t> der;
  der.reserve(kSpkiSize + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t padding = 0;
  for (size_t i = body; i < end; ++i) {
    const char c = pem[i];
    if (is_space(c)) continue;
    if (c == '=') {
      ++padding;
      continue;
    }
    const int v = base64_value(c);
    if (v < 0 || padding > 0)
      return make_error("PEM public key: invalid base64 at byte " + std::to_string(i));
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      der.push_back(static_cast<uint8_t>(acc >> bits));
      if (der.size() > kSpkiSize)
        return make_error("not an Ed25519 public key (longer than its " +
                          std::to_string(kSpkiSize) + " bytes of DER)");
    }
  }
  if (padding > 2 || bits >= 6)
    return make_error("PEM public key: truncated or badly padded base64");
  if (der.size() != kSpkiSize || std::memcmp(der.data(), kSpkiHeader, sizeof kSpkiHeader) != 0)
    return make_error("not an Ed25519 public key (" + std::to_string(der.size()) +
                      " bytes of DER, want the " + std::to_string(kSpkiSize) +
                      "-byte Ed25519 SubjectPublicKeyInfo)");
  Ed25519PublicKey key;
  std::memcpy(key.data(), der.data() + sizeof kSpkiHeader, key.size());
  return key;
}

}  // namespace weft
