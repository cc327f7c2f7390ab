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

// Where the line that begins at `pos` ends (its '\n', or the end), and its length without a '\r'.
size_t line_end(std::string_view text, size_t pos, size_t& length) {
  size_t nl = text.find('\n', pos);
  if (nl == std::string_view::npos) nl = text.size();
  length = nl - pos;
  if (length > 0 && text[pos + length - 1] == '\r') --length;
  return nl;
}

}  // namespace

// Only PEM as OpenSSL's own reader takes it (the fuzz target holds the two together): the BEGIN
// and END lines each a whole line, base64 lines in between (no blank ones), padded to a
// multiple of four characters.
Result<Ed25519PublicKey> ed25519_public_from_pem(std::string_view pem) {
  size_t begin = 0;
  for (;; ++begin) {
    begin = pem.find(kBegin, begin);
    if (begin == std::string_view::npos)
      return make_error("not a PEM public key: no '" + std::string(kBegin) + "' line");
    if (begin == 0 || pem[begin - 1] == '\n') break;
  }
  size_t length = 0;
  size_t pos = line_end(pem, begin, length) + 1;
  if (length != kBegin.size())
    return make_error("PEM public key: text after '" + std::string(kBegin) + "' on its line");

  std::vector<uint8_t> der;
  der.reserve(kSpkiSize + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t chars = 0, padding = 0;
  for (;;) {
    if (pos >= pem.size()) return make_error("PEM public key: no '" + std::string(kEnd) + "' line");
    const size_t next = line_end(pem, pos, length);
    const std::string_view line = pem.substr(pos, length);
    if (line.substr(0, kEnd.size()) == kEnd) {
      if (line.size() != kEnd.size())
        return make_error("PEM public key: text after '" + std::string(kEnd) + "' on its line");
      break;
    }
    if (line.empty())
      return make_error("PEM public key: a blank line at byte " + std::to_string(pos));
    for (size_t i = 0; i < line.size(); ++i) {
      const char c = line[i];
      if (c == ' ' || c == '\t') continue;
      ++chars;
      if (c == '=') {
        ++padding;
        continue;
      }
      const int v = base64_value(c);
      if (v < 0 || padding > 0)
        return make_error("PEM public key: invalid base64 at byte " + std::to_string(pos + i));
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
    pos = next + 1;
  }
  if (chars % 4 != 0 || padding > 2)
    return make_error("PEM public key: base64 not padded to a multiple of 4 characters");
  if (der.size() != kSpkiSize || std::memcmp(der.data(), kSpkiHeader, sizeof kSpkiHeader) != 0)
    return make_error("not an Ed25519 public key (" + std::to_string(der.size()) +
                      " bytes of DER, want the " + std::to_string(kSpkiSize) +
                      "-byte Ed25519 SubjectPublicKeyInfo)");
  Ed25519PublicKey key;
  std::memcpy(key.data(), der.data() + sizeof kSpkiHeader, key.size());
  return key;
}

}  // namespace weft
