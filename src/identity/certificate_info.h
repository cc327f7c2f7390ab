// Read-only facts about an X.509 certificate, for /certs, logs and authorization.
#pragma once

#include <ctime>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <openssl/x509.h>

#include "core/result.h"

namespace weft {

struct CertificateInfo {
  std::string subject;
  std::string serial_hex;
  std::vector<std::string> uri_sans;
  std::vector<std::string> dns_sans;
  std::time_t not_before = 0;
  std::time_t not_after = 0;
  bool is_ca = false;

  // The first spiffe:// URI SAN, which is the workload's identity.
  std::optional<std::string> spiffe_id() const;
};

CertificateInfo describe_certificate(X509* cert);
Result<CertificateInfo> load_certificate_info(const std::filesystem::path& pem);
// The first certificate in PEM text; `name` says where it came from in errors.
Result<CertificateInfo> parse_certificate_info(const std::string& pem, const std::string& name);

std::string format_utc(std::time_t t);

}  // namespace weft
