#include "p2p/probe.h"

#include <openssl/rand.h>

#include <cstring>

#include "identity/openssl_ptr.h"

namespace weft::probe {

namespace {
constexpr uint8_t kMagic[8] = {0x10, 'w', 'e', 'f', 't', 'p', 'r', 'b'};
constexpr size_t kTypeAt = 8, kKeyAt = 9, kTxAt = 41, kAddrAt = 53;
constexpr size_t kAddrSize = 19;  // family, port, 16 address bytes
constexpr size_t kSigSize = 64;

Result<std::optional<boost::asio::ip::udp::endpoint>> read_address(const uint8_t* at) {
  const uint8_t family = at[0];
  const uint16_t port = static_cast<uint16_t>(at[1] << 8 | at[2]);
  const uint8_t* addr = at + 3;
  if (family == 4) {
    boost::asio::ip::address_v4::bytes_type b;
    std::memcpy(b.data(), addr, 4);
    return std::optional(boost::asio::ip::udp::endpoint(boost::asio::ip::address_v4(b), port));
  }
  if (family == 6) {
    boost::asio::ip::address_v6::bytes_type b;
    std::memcpy(b.data(), addr, 16);
    return std::optional(boost::asio::ip::udp::endpoint(boost::asio::ip::address_v6(b), port));
  }
  if (family != 0)
    return make_error("unknown address family " + std::to_string(family) + " in probe");
  return std::optional<boost::asio::ip::udp::endpoint>();
}

void write_address(uint8_t* at, const boost::asio::ip::udp::endpoint& e) {
  const auto a = e.address();
  at[0] = a.is_v4() ? 4 : 6;
  at[1] = static_cast<uint8_t>(e.port() >> 8);
  at[2] = static_cast<uint8_t>(e.port());
  if (a.is_v4()) {
    const auto b = a.to_v4().to_bytes();
    std::memcpy(at + 3, b.data(), 4);
  } else {
    const auto b = a.to_v6().to_bytes();
    std::memcpy(at + 3, b.data(), 16);
  }
}
}  // namespace

bool looks_like_probe(const uint8_t* data, size_t len) {
  return len >= sizeof kMagic && std::memcmp(data, kMagic, sizeof kMagic) == 0;
}

TxId new_tx() {
  TxId t;
  RAND_bytes(t.data(), static_cast<int>(t.size()));
  return t;
}

Result<Probe> parse(const uint8_t* data, size_t len) {
  if (len <= kAddrAt) return make_error("probe of " + std::to_string(len) + " bytes is too short");
  if (!looks_like_probe(data, len)) return make_error("probe without the magic header");
  Probe p;
  if (data[kTypeAt] < 1 || data[kTypeAt] > 3)
    return make_error("unknown probe type " + std::to_string(data[kTypeAt]));
  p.type = static_cast<Type>(data[kTypeAt]);
  const size_t count = p.type == Type::call_me_maybe ? data[kAddrAt] : 0;
  if (count > kMaxOffered)
    return make_error("call-me-maybe offers " + std::to_string(count) + " addresses (at most " +
                      std::to_string(kMaxOffered) + ")");
  const size_t expected =
      p.type == Type::call_me_maybe ? kAddrAt + 1 + count * kAddrSize + kSigSize : kSize;
  const bool padded = p.type == Type::ping && len > kSize && len <= kFullDatagram;
  if (len != expected && !padded)
    return make_error("probe of " + std::to_string(len) + " bytes (expected " +
                      std::to_string(expected) + ")");
  const size_t signed_len = expected - kSigSize;
  std::memcpy(p.sender.data(), data + kKeyAt, p.sender.size());
  std::memcpy(p.tx.data(), data + kTxAt, p.tx.size());
  if (p.type == Type::call_me_maybe) {
    for (size_t i = 0; i < count; ++i) {
      auto a = read_address(data + kAddrAt + 1 + i * kAddrSize);
      if (!a) return make_error(a.error());
      if (!*a) return make_error("call-me-maybe offers an address without a family");
      p.offered.push_back(**a);
    }
  } else {
    auto a = read_address(data + kAddrAt);
    if (!a) return make_error(a.error());
    p.observed = *a;
  }
  ossl::Key key(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, p.sender.data(), p.sender.size()));
  if (!key) return make_error("probe sender key is not an Ed25519 key");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, key.get()) == 1 &&
                  EVP_DigestVerify(ctx, data + signed_len, kSigSize, data, signed_len) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) return make_error("probe signature does not verify");
  return p;
}

Result<std::vector<uint8_t>> encode(const Probe& p, EVP_PKEY* key, size_t pad_to) {
  const bool call = p.type == Type::call_me_maybe;
  if (call && p.offered.size() > kMaxOffered)
    return make_error("call-me-maybe can offer at most " + std::to_string(kMaxOffered) +
                      " addresses");
  const size_t size = call ? kAddrAt + 1 + p.offered.size() * kAddrSize + kSigSize : kSize;
  std::vector<uint8_t> out(size, 0);
  std::memcpy(out.data(), kMagic, sizeof kMagic);
  out[kTypeAt] = static_cast<uint8_t>(p.type);
  std::memcpy(out.data() + kKeyAt, p.sender.data(), p.sender.size());
  std::memcpy(out.data() + kTxAt, p.tx.data(), p.tx.size());
  if (call) {
    out[kAddrAt] = static_cast<uint8_t>(p.offered.size());
    for (size_t i = 0; i < p.offered.size(); ++i)
      write_address(out.data() + kAddrAt + 1 + i * kAddrSize, p.offered[i]);
  } else if (p.observed) {
    write_address(out.data() + kAddrAt, *p.observed);
  }
  const size_t signed_len = size - kSigSize;
  size_t sig_len = kSigSize;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok =
      EVP_DigestSignInit(ctx, nullptr, nullptr, nullptr, key) == 1 &&
      EVP_DigestSign(ctx, out.data() + signed_len, &sig_len, out.data(), signed_len) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok || sig_len != kSigSize) return make_error("signing a probe failed");
  if (p.type == Type::ping && pad_to > out.size()) out.resize(std::min(pad_to, kFullDatagram), 0);
  return out;
}

}  // namespace weft::probe
