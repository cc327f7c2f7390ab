#include "identity/certificate_authority.h"

#include <fcntl.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <stdexcept>

#include "identity/certificate_info.h"
#include "identity/openssl_ptr.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace fs = std::filesystem;

Result<KeyType> parse_key_type(std::string_view text) {
  if (text == "ed25519") return KeyType::ed25519;
  if (text == "ecdsa-p256") return KeyType::ecdsa_p256;
  return make_error("unknown key type '" + std::string(text) + "': use ed25519 or ecdsa-p256");
}

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

ossl::Key generate_key(KeyType type) {
  EVP_PKEY* key = type == KeyType::ed25519 ? EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")
                                           : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  if (!key) fail("key generation failed: " + ossl::last_error());
  return ossl::Key(key);
}

const EVP_MD* digest_for(EVP_PKEY* key) {
  // Ed25519 signs the message itself; passing a digest is an error.
  return EVP_PKEY_get_id(key) == EVP_PKEY_ED25519 ? nullptr : EVP_sha256();
}

void add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (!ext) fail("bad certificate extension '" + value + "': " + ossl::last_error());
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

ossl::Cert new_cert(EVP_PKEY* key, const std::string& cn, std::chrono::seconds not_before_offset,
                    Millis ttl) {
  ossl::Cert cert(X509_new());
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  RAND_bytes(serial, sizeof serial);
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  const long nb = static_cast<long>(not_before_offset.count());
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), nb);
  X509_gmtime_adj(
      X509_getm_notAfter(cert.get()),
      nb + static_cast<long>(std::chrono::duration_cast<std::chrono::seconds>(ttl).count()));
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>("weft"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  return cert;
}

std::string pem_of(X509* cert) {
  ossl::Bio bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), cert);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string pem_of(EVP_PKEY* key) {
  ossl::Bio bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("cannot read " + p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void ensure_dir(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create directory " + dir.string() + ": " + ec.message());
}

}  // namespace

void write_file_atomic(const fs::path& path, const std::string& data, unsigned mode) {
  const fs::path tmp = path.string() + ".tmp";
  int fd = ::open(tmp.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) fail("cannot write " + tmp.string() + ": " + std::strerror(errno));
  ::fchmod(fd, mode);  // the umask must not widen or narrow what we asked for
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n <= 0) {
      ::close(fd);
      fail("cannot write " + tmp.string() + ": " + std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    fail("cannot rename " + tmp.string() + " to " + path.string() + ": " + std::strerror(errno));
}

void init_ca(const CaInitOptions& o) {
  auto td = parse_trust_domain(o.trust_domain);
  if (!td) fail(td.error());
  ensure_dir(o.out_dir);
  if (fs::exists(o.out_dir / "ca.key"))
    fail(o.out_dir.string() +
         "/ca.key already exists; refusing to overwrite a CA (remove it first)");
  auto key = generate_key(o.key_type);
  auto cert = new_cert(key.get(), "weft root CA " + *td, std::chrono::seconds(-60), o.ttl);
  X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get()));
  add_ext(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE");
  add_ext(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign");
  add_ext(cert.get(), cert.get(), NID_subject_key_identifier, "hash");
  add_ext(cert.get(), cert.get(), NID_subject_alt_name, "URI:spiffe://" + *td);
  if (!X509_sign(cert.get(), key.get(), digest_for(key.get())))
    fail("signing the CA certificate failed: " + ossl::last_error());
  write_file_atomic(o.out_dir / "ca.key", pem_of(key.get()), 0600);
  write_file_atomic(o.out_dir / "ca.crt", pem_of(cert.get()), 0644);
}

void issue_certificate(const IssueOptions& o) {
  auto id = parse_spiffe_id(o.spiffe_id);
  if (!id) fail(id.error());
  const std::string ca_pem = read_file(o.ca_dir / "ca.crt");
  const std::string key_pem = read_file(o.ca_dir / "ca.key");
  ossl::Bio cb(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())));
  ossl::Cert ca(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
  if (!ca) fail("no CA certificate in " + (o.ca_dir / "ca.crt").string());
  ossl::Bio kb(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  ossl::Key ca_key(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
  if (!ca_key) fail("no CA private key in " + (o.ca_dir / "ca.key").string());
  const auto ca_info = describe_certificate(ca.get());
  const auto ca_id = ca_info.spiffe_id();
  if (ca_id && *ca_id != "spiffe://" + id->trust_domain)
    fail("SPIFFE ID " + o.spiffe_id + " is outside this CA's trust domain (" + *ca_id + ")");

  ensure_dir(o.out_dir);
  auto key = generate_key(o.key_type);
  auto cert = new_cert(key.get(), id->service_account + "." + id->ns, o.not_before_offset, o.ttl);
  X509_set_issuer_name(cert.get(), X509_get_subject_name(ca.get()));
  add_ext(cert.get(), ca.get(), NID_basic_constraints, "critical,CA:FALSE");
  add_ext(cert.get(), ca.get(), NID_key_usage,
          o.key_type == KeyType::ed25519 ? "critical,digitalSignature"
                                         : "critical,digitalSignature,keyAgreement");
  add_ext(cert.get(), ca.get(), NID_ext_key_usage, "serverAuth,clientAuth");
  add_ext(cert.get(), ca.get(), NID_subject_key_identifier, "hash");
  add_ext(cert.get(), ca.get(), NID_authority_key_identifier, "keyid:always");
  std::string san = "URI:" + id->to_string();
  for (const auto& dns : o.dns_names) san += ",DNS:" + dns;
  add_ext(cert.get(), ca.get(), NID_subject_alt_name, san);
  if (!X509_sign(cert.get(), ca_key.get(), digest_for(ca_key.get())))
    fail("signing the certificate failed: " + ossl::last_error());
  // Key first: a watcher that sees the new certificate must find its key already in place.
  write_file_atomic(o.out_dir / "key.pem", pem_of(key.get()), 0600);
  write_file_atomic(o.out_dir / "cert.pem", pem_of(cert.get()), 0644);
  write_file_atomic(o.out_dir / "ca.crt", ca_pem, 0644);
}

}  // namespace weft
