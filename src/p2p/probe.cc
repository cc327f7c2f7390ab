#include "p2p/probe.h"

#include <openssl/rand.h>

#include <cstring>

#include "identity/openssl_ptr.h"

namespace weft::probe {

namespace {
constexpr uint8_t kMagic[8] = {0x10, 'w', 'e', 'f', 't', 'p', 'r', 'b'};
constexpr size_t kSigned = kSize - 64;
constexpr size_t kTypeAt = 8, kKeyAt = 9, kTxAt = 41, kAddrAt = 53;
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
  if (len != kSize)
    return make_error("probe of " + std::to_string(len) + " bytes (expected " +
                      std::to_string(kSize) + ")");
  if (!looks_like_probe(data, len)) return make_error("probe without the magic header");
  Probe p;
  if (data[kTypeAt] != 1 && data[kTypeAt] != 2)
    return make_error("unknown probe type " + std::to_string(data[kTypeAt]));
  p.type = static_cast<Type>(data[kTypeAt]);
  std::memcpy(p.sender.data(), data + kKeyAt, p.sender.size());
  std::memcpy(p.tx.data(), data + kTxAt, p.tx.size());
  const uint8_t family = data[kAddrAt];
  const uint16_t port = static_cast<uint16_t>(data[kAddrAt + 1] << 8 | data[kAddrAt + 2]);
  const uint8_t* addr = data + kAddrAt + 3;
  if (family == 4) {
    boost::asio::ip::address_v4::bytes_type b;
    std::memcpy(b.data(), addr, 4);
    p.observed = boost::asio::ip::udp::endpoint(boost::asio::ip::address_v4(b), port);
  } else if (family == 6) {
    boost::asio::ip::address_v6::bytes_type b;
    std::memcpy(b.data(), addr, 16);
    p.observed = boost::asio::ip::udp::endpoint(boost::asio::ip::address_v6(b), port);
  } else if (family != 0) {
    return make_error("unknown address family " + std::to_string(family) + " in probe");
  }
  ossl::Key key(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, p.sender.data(), p.sender.size()));
  if (!key) return make_error("probe sender key is not an Ed25519 key");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, key.get()) == 1 &&
                  EVP_DigestVerify(ctx, data + kSigned, 64, data, kSigned) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) return make_error("probe signature does not verify");
  return p;
}

Result<std::vector<uint8_t>> encode(const Probe& p, EVP_PKEY* key) {
  std::vector<uint8_t> out(kSize, 0);
  std::memcpy(out.data(), kMagic, sizeof kMagic);
  out[kTypeAt] = static_cast<uint8_t>(p.type);
  std::memcpy(out.data() + kKeyAt, p.sender.data(), p.sender.size());
  std::memcpy(out.data() + kTxAt, p.tx.data(), p.tx.size());
  if (p.observed) {
    const auto a = p.observed->address();
    out[kAddrAt] = a.is_v4() ? 4 : 6;
    out[kAddrAt + 1] = static_cast<uint8_t>(p.observed->port() >> 8);
    out[kAddrAt + 2] = static_cast<uint8_t>(p.observed->port());
    if (a.is_v4()) {
      const auto b = a.to_v4().to_bytes();
      std::memcpy(out.data() + kAddrAt + 3, b.data(), 4);
    } else {
      const auto b = a.to_v6().to_bytes();
      std::memcpy(out.data() + kAddrAt + 3, b.data(), 16);
    }
  }
  size_t sig_len = 64;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = EVP_DigestSignInit(ctx, nullptr, nullptr, nullptr, key) == 1 &&
                  EVP_DigestSign(ctx, out.data() + kSigned, &sig_len, out.data(), kSigned) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok || sig_len != 64) return make_error("signing a probe failed");
  return out;
}

}  // namespace weft::probe
