// The Ed25519 PEM reader against OpenSSL's own, and CSR checks that sign once.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <unistd.h>
#include <filesystem>
#include <string>

#include "identity/certificate_authority.h"
#include "identity/certificate_info.h"
#include "identity/csr.h"
#include "identity/ed25519_pem.h"

namespace weft {
namespace {

Ed25519PublicKey openssl_raw(const std::string& pem) {
  BIO* b = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY* key = PEM_read_bio_PUBKEY(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  Ed25519PublicKey raw{};
  size_t len = raw.size();
  EXPECT_TRUE(key && EVP_PKEY_get_raw_public_key(key, raw.data(), &len) == 1);
  EVP_PKEY_free(key);
  return raw;
}

TEST(Ed25519Pem, ReadsTheSameKeyAsOpenSsl) {
  for (int i = 0; i < 20; ++i) {
    const KeyPair kp = generate_ed25519();
    auto key = ed25519_public_from_pem(kp.public_pem);
    ASSERT_TRUE(key.ok()) << key.error();
    EXPECT_EQ(*key, openssl_raw(kp.public_pem));
  }
}

TEST(Ed25519Pem, AcceptsOtherLineBreaksAndSurroundingText) {
  const KeyPair kp = generate_ed25519();
  std::string rewrapped;
  for (char c : kp.public_pem) {
    rewrapped += c;
    if (c == 'A') rewrapped += "\r\n";  // breaks in odd places, as some tools write them
  }
  auto key = ed25519_public_from_pem("some preamble\n" + rewrapped + "trailer");
  ASSERT_TRUE(key.ok()) << key.error();
  EXPECT_EQ(*key, openssl_raw(kp.public_pem));
}

TEST(Ed25519Pem, RefusesOtherKeysAndBrokenTextSayingWhy) {
  // An EC P-256 key: a valid PEM public key, but not Ed25519.
  EVP_PKEY* ec = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  BIO* b = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(b, ec);
  char* data = nullptr;
  const std::string ec_pem(data, static_cast<size_t>(BIO_get_mem_data(b, &data)));
  BIO_free(b);
  EVP_PKEY_free(ec);
  const KeyPair kp = generate_ed25519();
  const std::string body = kp.public_pem.substr(27, 60);  // the base64 line
  const struct {
    std::string pem, says;
  } cases[] = {
      {"", "no '-----BEGIN PUBLIC KEY-----'"},
      {"-----BEGIN PUBLIC KEY-----\n" + body + "\n", "no '-----END PUBLIC KEY-----'"},
      {ec_pem, "not an Ed25519 public key"},
      {"-----BEGIN PUBLIC KEY-----\n" + body.substr(0, 40) + "\n-----END PUBLIC KEY-----\n",
       "not an Ed25519 public key"},
      {"-----BEGIN PUBLIC KEY-----\n" + body + body + "\n-----END PUBLIC KEY-----\n",
       "invalid base64 at byte 87"},  // data after the first '=' padding
      {"-----BEGIN PUBLIC KEY-----\n" + body.substr(0, 56) + body.substr(0, 56) +
           "\n-----END PUBLIC KEY-----\n",
       "longer than its 44 bytes"},
      {"-----BEGIN PUBLIC KEY-----\n" + body.substr(0, 30) + "*" + body.substr(31) +
           "\n-----END PUBLIC KEY-----\n",
       "invalid base64 at byte 57"},
      {"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA=A\n-----END PUBLIC KEY-----\n",
       "invalid base64"},
      // Shapes OpenSSL's PEM reader refuses too (fuzz_ed25519_pem holds the two together).
      {"x-----BEGIN PUBLIC KEY-----\n" + body + "\n-----END PUBLIC KEY-----\n",
       "no '-----BEGIN PUBLIC KEY-----' line"},
      {"-----BEGIN PUBLIC KEY----- " + body + "\n-----END PUBLIC KEY-----\n",
       "text after '-----BEGIN PUBLIC KEY-----'"},
      {"-----BEGIN PUBLIC KEY-----\n" + body + "-----END PUBLIC KEY-----\n", "invalid base64"},
      {"-----BEGIN PUBLIC KEY-----\n" + body + "\n-----END PUBLIC KEY----- x\n",
       "text after '-----END PUBLIC KEY-----'"},
      {"-----BEGIN PUBLIC KEY-----\n\n" + body + "\n-----END PUBLIC KEY-----\n",
       "a blank line at byte 27"},
      {"-----BEGIN PUBLIC KEY-----\n" + body.substr(0, 59) + "\n-----END PUBLIC KEY-----\n",
       "not padded to a multiple of 4"},
      // The Ed25519 header with a different algorithm OID (X25519, 1.3.101.110).
      {"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEA" + body.substr(16) +
           "\n-----END PUBLIC KEY-----\n",
       "not an Ed25519 public key"},
  };
  for (const auto& c : cases) {
    auto key = ed25519_public_from_pem(c.pem);
    ASSERT_FALSE(key.ok()) << c.pem;
    EXPECT_NE(key.error().find(c.says), std::string::npos) << key.error();
  }
}

TEST(SigningCa, AVerifiedCsrIsForItsKeyOnly) {
  const KeyPair node = generate_ed25519();
  const KeyPair other = generate_ed25519();
  auto csr = make_csr(node.private_pem, "node");
  ASSERT_TRUE(csr.ok()) << csr.error();
  auto ok = SigningCa::verify_csr(*csr, node.public_pem);
  ASSERT_TRUE(ok.ok()) << ok.error();
  EXPECT_TRUE(*ok);
  auto wrong = SigningCa::verify_csr(*csr, other.public_pem);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.error().find("different key"), std::string::npos) << wrong.error();
  auto garbage = SigningCa::verify_csr("not a csr", node.public_pem);
  ASSERT_FALSE(garbage.ok());
  EXPECT_NE(garbage.error().find("not a PEM certificate request"), std::string::npos);
}

// The issued certificate carries exactly the CSR's key (set from its raw bytes for Ed25519) and
// verifies under the CA, for both CA key types.
TEST(SigningCa, SignsTheRequestsKeyUnderEitherCaKeyType) {
  for (KeyType ca_type : {KeyType::ed25519, KeyType::ecdsa_p256}) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("weft-identity-test-" + std::to_string(::getpid()) +
                      (ca_type == KeyType::ed25519 ? "-ed" : "-ec"));
    std::filesystem::remove_all(dir);
    init_ca({"test.local", ca_type, dir});
    auto ca = SigningCa::load(dir);
    ASSERT_TRUE(ca.ok()) << ca.error();
    const KeyPair node = generate_ed25519();
    auto csr = make_csr(node.private_pem, "node");
    ASSERT_TRUE(csr.ok()) << csr.error();
    auto verified = SigningCa::verify_csr(*csr, node.public_pem);
    ASSERT_TRUE(verified.ok()) << verified.error();
    auto pem = ca->sign(*verified, "spiffe://test.local/cluster/c/node/n", std::chrono::hours(1));
    ASSERT_TRUE(pem.ok()) << pem.error();

    BIO* b = BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size()));
    X509* cert = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
    BIO_free(b);
    ASSERT_NE(cert, nullptr);
    EVP_PKEY* key = X509_get0_pubkey(cert);
    ASSERT_NE(key, nullptr);
    ASSERT_EQ(EVP_PKEY_get_id(key), EVP_PKEY_ED25519);
    Ed25519PublicKey raw{};
    size_t len = raw.size();
    ASSERT_EQ(EVP_PKEY_get_raw_public_key(key, raw.data(), &len), 1);
    EXPECT_EQ(raw, *ed25519_public_from_pem(node.public_pem));

    b = BIO_new_mem_buf(ca->bundle_pem().data(), static_cast<int>(ca->bundle_pem().size()));
    X509* root = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
    BIO_free(b);
    ASSERT_NE(root, nullptr);
    EXPECT_EQ(X509_verify(cert, X509_get0_pubkey(root)), 1);
    EXPECT_EQ(describe_certificate(cert).spiffe_id(), "spiffe://test.local/cluster/c/node/n");
    X509_free(root);
    X509_free(cert);
    std::filesystem::remove_all(dir);
  }
}

}  // namespace
}  // namespace weft
