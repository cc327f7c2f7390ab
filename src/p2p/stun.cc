#include "p2p/stun.h"

#include <openssl/rand.h>

#include <fmt/format.h>

#include <cstring>

namespace weft::stun {

namespace ip = boost::asio::ip;

namespace {

enum Attribute : uint16_t {
  kMappedAddress = 0x0001,
  kErrorCode = 0x0009,
  kUnknownAttributes = 0x000A,
  kXorMappedAddress = 0x0020,
  kSoftware = 0x8022,
  kFingerprint = 0x8028,
  kResponseOrigin = 0x802B,
  kOtherAddress = 0x802C,
};

constexpr uint32_t kFingerprintXor = 0x5354554e;
constexpr const char* kSoftwareName = "weft";

uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t be32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) << 24 | static_cast<uint32_t>(p[1]) << 16 |
         static_cast<uint32_t>(p[2]) << 8 | p[3];
}
void put16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}
void put32(std::vector<uint8_t>& out, uint32_t v) {
  put16(out, static_cast<uint16_t>(v >> 16));
  put16(out, static_cast<uint16_t>(v));
}

// CRC-32 (ISO-HDLC, as zlib), which FINGERPRINT uses.
uint32_t crc32(const uint8_t* data, size_t len) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < len; ++i) c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// XOR-MAPPED-ADDRESS hides an IPv6 address under the cookie followed by the transaction ID.
std::array<uint8_t, 16> ipv6_mask(const TransactionId& id) {
  std::array<uint8_t, 16> mask{};
  for (size_t i = 0; i < 4; ++i) mask[i] = static_cast<uint8_t>(kMagicCookie >> (24 - 8 * i));
  std::memcpy(mask.data() + 4, id.data(), 12);
  return mask;
}

// MAPPED-ADDRESS and its XOR form: family, port, address; XOR with the cookie (and, for IPv6,
// the transaction ID).
Result<ip::udp::endpoint> read_address(const uint8_t* v, size_t len, bool xored,
                                       const TransactionId& id) {
  if (len < 4) return make_error("address attribute shorter than 4 bytes");
  const uint8_t family = v[1];
  uint16_t port = be16(v + 2);
  if (xored) port ^= static_cast<uint16_t>(kMagicCookie >> 16);
  if (family == 0x01) {
    if (len != 8) return make_error("IPv4 address attribute is not 8 bytes");
    uint32_t a = be32(v + 4);
    if (xored) a ^= kMagicCookie;
    return ip::udp::endpoint(ip::address_v4(a), port);
  }
  if (family == 0x02) {
    if (len != 20) return make_error("IPv6 address attribute is not 20 bytes");
    ip::address_v6::bytes_type b;
    std::memcpy(b.data(), v + 4, 16);
    if (xored) {
      const auto mask = ipv6_mask(id);
      for (size_t i = 0; i < 16; ++i) b[i] ^= mask[i];
    }
    return ip::udp::endpoint(ip::address_v6(b), port);
  }
  return make_error("unknown address family " + std::to_string(family));
}

void put_address(std::vector<uint8_t>& out, uint16_t type, const ip::udp::endpoint& ep, bool xored,
                 const TransactionId& id) {
  const bool v4 = ep.address().is_v4();
  put16(out, type);
  put16(out, v4 ? 8 : 20);
  out.push_back(0);
  out.push_back(v4 ? 0x01 : 0x02);
  uint16_t port = ep.port();
  if (xored) port ^= static_cast<uint16_t>(kMagicCookie >> 16);
  put16(out, port);
  if (v4) {
    uint32_t a = ep.address().to_v4().to_uint();
    if (xored) a ^= kMagicCookie;
    put32(out, a);
  } else {
    auto b = ep.address().to_v6().to_bytes();
    if (xored) {
      const auto mask = ipv6_mask(id);
      for (size_t i = 0; i < 16; ++i) b[i] ^= mask[i];
    }
    out.insert(out.end(), b.begin(), b.end());
  }
}

std::vector<uint8_t> header(MessageType type, const TransactionId& id) {
  std::vector<uint8_t> out;
  out.reserve(128);
  put16(out, static_cast<uint16_t>(type));
  put16(out, 0);  // length, set by finish()
  put32(out, kMagicCookie);
  out.insert(out.end(), id.begin(), id.end());
  return out;
}

void put_text(std::vector<uint8_t>& out, uint16_t type, const std::string& text) {
  put16(out, type);
  put16(out, static_cast<uint16_t>(text.size()));
  out.insert(out.end(), text.begin(), text.end());
  while (out.size() % 4) out.push_back(0);
}

// SOFTWARE, then FINGERPRINT over everything before it (with the length already counting it).
std::vector<uint8_t> finish(std::vector<uint8_t> out) {
  put_text(out, kSoftware, kSoftwareName);
  const size_t body = out.size() - kHeaderSize + 8;
  out[2] = static_cast<uint8_t>(body >> 8);
  out[3] = static_cast<uint8_t>(body);
  const uint32_t fp = crc32(out.data(), out.size()) ^ kFingerprintXor;
  put16(out, kFingerprint);
  put16(out, 4);
  put32(out, fp);
  return out;
}

}  // namespace

bool looks_like_stun(const uint8_t* data, size_t len) {
  return len >= kHeaderSize && (data[0] & 0xC0) == 0 && be32(data + 4) == kMagicCookie;
}

Result<Message> parse(const uint8_t* data, size_t len) {
  if (len < kHeaderSize) return make_error("shorter than a STUN header (20 bytes)");
  if ((data[0] & 0xC0) != 0) return make_error("not STUN: the top two bits are set");
  if (be32(data + 4) != kMagicCookie) return make_error("not STUN: no magic cookie");
  const size_t body = be16(data + 2);
  if (body % 4)
    return make_error("STUN length " + std::to_string(body) + " is not a multiple of 4");
  if (kHeaderSize + body != len)
    return make_error("STUN length " + std::to_string(body) + " does not match the datagram (" +
                      std::to_string(len - kHeaderSize) + " bytes after the header)");
  Message m;
  m.type = be16(data);
  std::memcpy(m.transaction.data(), data + 8, 12);
  size_t off = kHeaderSize;
  while (off < len) {
    if (len - off < 4)
      return make_error("truncated attribute header at byte " + std::to_string(off));
    const uint16_t type = be16(data + off);
    const size_t alen = be16(data + off + 2);
    const size_t padded = (alen + 3) & ~size_t{3};
    if (len - off - 4 < padded)
      return make_error(fmt::format("attribute 0x{:04x} at byte {} runs past the end", type, off));
    const uint8_t* v = data + off + 4;
    if (m.has_fingerprint) return make_error("attribute after FINGERPRINT");
    switch (type) {
      case kMappedAddress:
      case kXorMappedAddress:
      case kOtherAddress:
      case kResponseOrigin: {
        auto a = read_address(v, alen, type == kXorMappedAddress, m.transaction);
        if (!a) return make_error(a.error());
        (type == kMappedAddress      ? m.mapped_address
         : type == kXorMappedAddress ? m.xor_mapped_address
         : type == kOtherAddress     ? m.other_address
                                     : m.response_origin) = *a;
        break;
      }
      case kSoftware:
        if (alen > 763) return make_error("SOFTWARE longer than 763 bytes");
        m.software.assign(reinterpret_cast<const char*>(v), alen);
        break;
      case kErrorCode:
        if (alen < 4) return make_error("ERROR-CODE shorter than 4 bytes");
        m.error_code = (v[2] & 0x7) * 100 + v[3] % 100;
        break;
      case kFingerprint: {
        if (alen != 4) return make_error("FINGERPRINT is not 4 bytes");
        // The CRC covers the message up to this attribute, with the header's length as sent.
        const uint32_t want = crc32(data, off) ^ kFingerprintXor;
        if (be32(v) != want) return make_error("FINGERPRINT does not match");
        m.has_fingerprint = true;
        break;
      }
      case kUnknownAttributes:
      case 0x0006:  // USERNAME
      case 0x0008:  // MESSAGE-INTEGRITY
      case 0x0014:  // REALM
      case 0x0015:  // NONCE
      case 0x001C:  // MESSAGE-INTEGRITY-SHA256
      case 0x001D:  // PASSWORD-ALGORITHM
      case 0x001E:  // USERHASH
      case 0x0024:  // PRIORITY (ICE)
      case 0x0025:  // USE-CANDIDATE (ICE)
        break;      // known; Binding without credentials has no use for them
      default:
        // 0x0000-0x7FFF are comprehension-required: a message with one we do not know is
        // refused (RFC 8489 §6.3.3 discards such an answer).
        if (type < 0x8000)
          return make_error(fmt::format("unknown comprehension-required attribute 0x{:04x}", type));
        break;
    }
    off += 4 + padded;
  }
  return m;
}

TransactionId new_transaction_id() {
  TransactionId id{};
  RAND_bytes(id.data(), static_cast<int>(id.size()));
  return id;
}

std::vector<uint8_t> binding_request(const TransactionId& id) {
  return finish(header(MessageType::binding_request, id));
}

std::vector<uint8_t> binding_success(const TransactionId& id, const ip::udp::endpoint& mapped,
                                     const std::optional<ip::udp::endpoint>& other,
                                     const std::optional<ip::udp::endpoint>& origin) {
  auto out = header(MessageType::binding_success, id);
  put_address(out, kXorMappedAddress, mapped, true, id);
  put_address(out, kMappedAddress, mapped, false, id);
  if (other) put_address(out, kOtherAddress, *other, false, id);
  if (origin) put_address(out, kResponseOrigin, *origin, false, id);
  return finish(std::move(out));
}

std::vector<uint8_t> binding_error(const TransactionId& id, int code, const std::string& reason) {
  auto out = header(MessageType::binding_error, id);
  std::string value;
  value.push_back(0);
  value.push_back(0);
  value.push_back(static_cast<char>(code / 100));
  value.push_back(static_cast<char>(code % 100));
  value += reason;
  put_text(out, kErrorCode, value);
  return finish(std::move(out));
}

}  // namespace weft::stun
