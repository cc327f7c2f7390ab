#include <openssl/evp.h>
#include <openssl/pem.h>

#include <string_view>

#include "identity/ed25519_pem.h"

// Whatever the fast reader accepts, OpenSSL must read as the same Ed25519 key.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto key = weft::ed25519_public_from_pem(text);
  if (!key.ok()) return 0;
  BIO* b = BIO_new_mem_buf(data, static_cast<int>(size));
  EVP_PKEY* pkey = PEM_read_bio_PUBKEY(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  weft::Ed25519PublicKey raw{};
  size_t len = raw.size();
  const bool same = pkey && EVP_PKEY_get_id(pkey) == EVP_PKEY_ED25519 &&
                    EVP_PKEY_get_raw_public_key(pkey, raw.data(), &len) == 1 && raw == *key;
  EVP_PKEY_free(pkey);
  if (!same) __builtin_trap();
  return 0;
}
