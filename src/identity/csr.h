// Certificate signing requests: an agent proves it holds its Ed25519 node key by signing a CSR
// with it; control checks that signature and signs a short-lived certificate for the same key.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "core/duration.h"
#include "core/result.h"

namespace weft {

struct KeyPair {
  std::string private_pem;  // never logged, never returned by an API
  std::string public_pem;
};

KeyPair generate_ed25519();

// A PEM CSR signed with `private_pem`.
Result<std::string> make_csr(const std::string& private_pem, const std::string& common_name);

// The CA that signs for control: ca.crt + ca.key from `weft ca init`, or a plug-in intermediate.
class SigningCa {
 public:
  static Result<SigningCa> load(const std::filesystem::path& dir);
  const std::string& trust_domain() const { return trust_domain_; }
  const std::string& bundle_pem() const { return cert_pem_; }

  // A parsed CSR whose self-signature verified. Parsing and verifying cost more than signing,
  // so a caller that checks a CSR before signing it (registration) does both once.
  using VerifiedCsr = std::shared_ptr<X509_REQ>;

  // The CSR's self-signature and, if `expected_public_pem` is not empty, that it is for that key.
  static Result<VerifiedCsr> verify_csr(const std::string& csr_pem,
                                        const std::string& expected_public_pem);

  // A PEM certificate for the CSR's key whose URI SAN is `spiffe_uri`.
  // `extra_sans`: more subjectAltName entries, like ",DNS:localhost,IP:127.0.0.1".
  Result<std::string> sign(const VerifiedCsr& csr, const std::string& spiffe_uri, Millis ttl,
                           const std::string& extra_sans = {}) const;
  // verify_csr, then sign.
  Result<std::string> sign(const std::string& csr_pem, const std::string& spiffe_uri, Millis ttl,
                           const std::string& expected_public_pem = {},
                           const std::string& extra_sans = {}) const;

 private:
  std::string cert_pem_, trust_domain_;
  // Parsed once: OpenSSL 3 decodes PEM keys through its provider machinery, which cost more
  // than the signature itself when it ran per registration.
  std::shared_ptr<X509> cert_;
  std::shared_ptr<EVP_PKEY> key_;
};

}  // namespace weft
