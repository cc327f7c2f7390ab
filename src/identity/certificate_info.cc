#include "identity/certificate_info.h"

#include <openssl/pem.h>

#include <cstdio>

#include "identity/openssl_ptr.h"

namespace weft {

std::optional<std::string> CertificateInfo::spiffe_id() const {
  for (const auto& u : uri_sans) {
    if (u.rfind("spiffe://", 0) == 0) return u;
  }
  return std::nullopt;
}

namespace {

std::time_t asn1_to_time(const ASN1_TIME* t) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return timegm(&tm);
}

}  // namespace

CertificateInfo describe_certificate(X509* cert) {
  CertificateInfo info;
  char buf[512];
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
  info.subject = buf;
  if (BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr)) {
    char* hex = BN_bn2hex(bn);
    info.serial_hex = hex;
    OPENSSL_free(hex);
    BN_free(bn);
  }
  info.not_before = asn1_to_time(X509_get0_notBefore(cert));
  info.not_after = asn1_to_time(X509_get0_notAfter(cert));
  info.is_ca = X509_check_ca(cert) != 0;
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (names) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
      const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, i);
      if (gn->type == GEN_URI || gn->type == GEN_DNS) {
        const ASN1_IA5STRING* s =
            gn->type == GEN_URI ? gn->d.uniformResourceIdentifier : gn->d.dNSName;
        std::string v(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                      ASN1_STRING_length(s));
        (gn->type == GEN_URI ? info.uri_sans : info.dns_sans).push_back(std::move(v));
      }
    }
    GENERAL_NAMES_free(names);
  }
  return info;
}

Result<CertificateInfo> load_certificate_info(const std::filesystem::path& pem) {
  ossl::Bio bio(BIO_new_file(pem.c_str(), "r"));
  if (!bio) return make_error("cannot open certificate " + pem.string());
  ossl::Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return make_error("no PEM certificate in " + pem.string() + ": " + ossl::last_error());
  return describe_certificate(cert.get());
}

Result<CertificateInfo> parse_certificate_info(const std::string& pem, const std::string& name) {
  ossl::Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return make_error("no PEM certificate in " + name + ": " + ossl::last_error());
  return describe_certificate(cert.get());
}

std::string format_utc(std::time_t t) {
  struct tm tm {};
  gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  return buf;
}

}  // namespace weft
