#include "identity/csr.h"

#include <openssl/pem.h>
#include <openssl/rand.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "identity/certificate_info.h"
#include "identity/ed25519_pem.h"
#include "identity/openssl_ptr.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace {

std::string bio_string(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

ossl::Key read_private(const std::string& pem) {
  ossl::Bio b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return ossl::Key(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
}

std::string public_pem_of(EVP_PKEY* key) {
  ossl::Bio b(BIO_new(BIO_s_mem()));
  PEM_write_bio_PUBKEY(b.get(), key);
  return bio_string(b.get());
}

// Whether `key` is the key in `pem`. Ed25519 (every node key) compares raw keys; writing `key`
// as PEM to compare texts goes through OpenSSL 3's encoder machinery, a cost per registration.
bool is_public_key(EVP_PKEY* key, const std::string& pem) {
  if (auto ed = ed25519_public_from_pem(pem)) {
    Ed25519PublicKey raw{};
    size_t len = raw.size();
    return EVP_PKEY_get_id(key) == EVP_PKEY_ED25519 &&
           EVP_PKEY_get_raw_public_key(key, raw.data(), &len) == 1 && len == raw.size() &&
           raw == *ed;
  }
  return public_pem_of(key) == pem;
}

// The certificate's key, from the request's. An Ed25519 key's SubjectPublicKeyInfo is set from
// its raw bytes: X509_set_pubkey goes through OpenSSL 3's encoder and decoder machinery, a tenth
// of control's CPU per registration.
bool set_subject_key(X509* cert, EVP_PKEY* pub) {
  if (EVP_PKEY_get_id(pub) == EVP_PKEY_ED25519) {
    Ed25519PublicKey raw{};
    size_t len = raw.size();
    auto* enc = static_cast<unsigned char*>(OPENSSL_malloc(raw.size()));
    if (enc && EVP_PKEY_get_raw_public_key(pub, raw.data(), &len) == 1 && len == raw.size()) {
      std::memcpy(enc, raw.data(), raw.size());
      // On success the certificate owns `enc`.
      if (X509_PUBKEY_set0_param(X509_get_X509_PUBKEY(cert), OBJ_nid2obj(NID_ED25519), V_ASN1_UNDEF,
                                 nullptr, enc, static_cast<int>(raw.size())) == 1)
        return true;
    }
    OPENSSL_free(enc);
  }
  return X509_set_pubkey(cert, pub) == 1;
}

bool read_text(const std::filesystem::path& p, std::string& out) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return true;
}

}  // namespace

KeyPair generate_ed25519() {
  ossl::Key key(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  ossl::Bio b(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(b.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr);
  return {bio_string(b.get()), public_pem_of(key.get())};
}

Result<std::string> make_csr(const std::string& private_pem, const std::string& common_name) {
  auto key = read_private(private_pem);
  if (!key) return make_error("not a PEM private key");
  X509_REQ* req = X509_REQ_new();
  X509_REQ_set_version(req, 0);
  X509_NAME* name = X509_REQ_get_subject_name(req);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  X509_REQ_set_pubkey(req, key.get());
  const EVP_MD* md = EVP_PKEY_get_id(key.get()) == EVP_PKEY_ED25519 ? nullptr : EVP_sha256();
  if (!X509_REQ_sign(req, key.get(), md)) {
    X509_REQ_free(req);
    return make_error("signing the CSR failed: " + ossl::last_error());
  }
  ossl::Bio b(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509_REQ(b.get(), req);
  X509_REQ_free(req);
  return bio_string(b.get());
}

Result<SigningCa> SigningCa::load(const std::filesystem::path& dir) {
  SigningCa ca;
  if (!read_text(dir / "ca.crt", ca.cert_pem_))
    return make_error("cannot read " + (dir / "ca.crt").string() +
                      " (create a CA with 'weft ca init')");
  std::string key_pem;
  if (!read_text(dir / "ca.key", key_pem))
    return make_error("cannot read " + (dir / "ca.key").string());
  ossl::Bio b(BIO_new_mem_buf(ca.cert_pem_.data(), static_cast<int>(ca.cert_pem_.size())));
  ossl::Cert cert(PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr));
  if (!cert) return make_error((dir / "ca.crt").string() + " holds no PEM certificate");
  auto key = read_private(key_pem);
  OPENSSL_cleanse(key_pem.data(), key_pem.size());
  if (!key || X509_check_private_key(cert.get(), key.get()) != 1)
    return make_error((dir / "ca.key").string() + " does not match " + (dir / "ca.crt").string());
  auto info = describe_certificate(cert.get());
  if (!info.is_ca) return make_error((dir / "ca.crt").string() + " is not a CA certificate");
  ca.cert_.reset(cert.release(), X509_free);
  ca.key_.reset(key.release(), EVP_PKEY_free);
  auto id = info.spiffe_id();
  auto td = id ? spiffe_trust_domain(*id) : Result<std::string>(make_error("none"));
  if (!td)
    return make_error((dir / "ca.crt").string() +
                      " has no spiffe://<trust-domain> URI SAN; a plug-in CA needs one");
  ca.trust_domain_ = *td;
  return ca;
}

Result<SigningCa::VerifiedCsr> SigningCa::verify_csr(const std::string& csr_pem,
                                                     const std::string& expected_public_pem) {
  ossl::Bio rb(BIO_new_mem_buf(csr_pem.data(), static_cast<int>(csr_pem.size())));
  VerifiedCsr req(PEM_read_bio_X509_REQ(rb.get(), nullptr, nullptr, nullptr), X509_REQ_free);
  if (!req) return make_error("csr: not a PEM certificate request");
  EVP_PKEY* pub = X509_REQ_get0_pubkey(req.get());
  if (!pub) return make_error("csr: no public key");
  if (X509_REQ_verify(req.get(), pub) != 1) return make_error("csr: signature does not verify");
  if (!expected_public_pem.empty() && !is_public_key(pub, expected_public_pem))
    return make_error("csr: signed by a different key than public_key");
  return req;
}

Result<std::string> SigningCa::sign(const std::string& csr_pem, const std::string& spiffe_uri,
                                    Millis ttl, const std::string& expected_public_pem,
                                    const std::string& extra_sans) const {
  auto csr = verify_csr(csr_pem, expected_public_pem);
  if (!csr) return make_error(csr.error());
  return sign(*csr, spiffe_uri, ttl, extra_sans);
}

Result<std::string> SigningCa::sign(const VerifiedCsr& csr, const std::string& spiffe_uri,
                                    Millis ttl, const std::string& extra_sans) const {
  X509_REQ* req = csr.get();
  EVP_PKEY* pub = X509_REQ_get0_pubkey(req);
  X509* ca = cert_.get();
  EVP_PKEY* ca_key = key_.get();
  ossl::Cert cert(X509_new());
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  RAND_bytes(serial, sizeof serial);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -60);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()),
                  static_cast<long>(std::chrono::duration_cast<std::chrono::seconds>(ttl).count()));
  if (!set_subject_key(cert.get(), pub))
    return make_error("csr: cannot copy its public key: " + ossl::last_error());
  X509_set_subject_name(cert.get(), X509_REQ_get_subject_name(req));
  X509_set_issuer_name(cert.get(), X509_get_subject_name(ca));
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, ca, cert.get(), nullptr, nullptr, 0);
  const std::pair<int, std::string> exts[] = {
      {NID_basic_constraints, "critical,CA:FALSE"},
      {NID_key_usage, "critical,digitalSignature"},
      {NID_ext_key_usage, "serverAuth,clientAuth"},
      {NID_authority_key_identifier, "keyid:always"},
      {NID_subject_alt_name, "URI:" + spiffe_uri + extra_sans},
  };
  for (const auto& [nid, value] : exts) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (!ext) return make_error("bad extension " + value + ": " + ossl::last_error());
    X509_add_ext(cert.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  const EVP_MD* md = EVP_PKEY_get_id(ca_key) == EVP_PKEY_ED25519 ? nullptr : EVP_sha256();
  if (!X509_sign(cert.get(), ca_key, md))
    return make_error("signing failed: " + ossl::last_error());
  ossl::Bio out(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(out.get(), cert.get());
  return bio_string(out.get());
}

}  // namespace weft
