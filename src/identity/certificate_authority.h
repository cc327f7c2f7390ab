// The offline CA tooling behind `weft ca init` and `weft cert issue`: a root CA whose URI SAN
// names its trust domain, and leaf certificates that carry one SPIFFE ID each.
// Files: CA dir = ca.crt + ca.key; leaf dir = cert.pem + key.pem + ca.crt (the trust bundle).
// Private keys are written 0600 and replaced atomically (rename), so watchers never see half a
// file.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "core/duration.h"
#include "core/result.h"

namespace weft {

enum class KeyType { ed25519, ecdsa_p256 };

Result<KeyType> parse_key_type(std::string_view text);

struct CaInitOptions {
  std::string trust_domain;
  KeyType key_type = KeyType::ed25519;
  std::filesystem::path out_dir;
  Millis ttl = std::chrono::hours(24 * 365 * 10);
};

struct IssueOptions {
  std::filesystem::path ca_dir;
  std::string spiffe_id;
  std::filesystem::path out_dir;
  Millis ttl = std::chrono::hours(24);
  std::vector<std::string> dns_names;
  KeyType key_type = KeyType::ed25519;
  // Shifts the validity window; tests use it to mint already-expired certificates.
  std::chrono::seconds not_before_offset{-60};
};

// Both throw std::runtime_error with an operator-facing message (they run at the CLI edge).
void init_ca(const CaInitOptions& options);
void issue_certificate(const IssueOptions& options);

// Writes `data` to `path` through a temporary file and rename(2), with the given mode.
void write_file_atomic(const std::filesystem::path& path, const std::string& data, unsigned mode);

}  // namespace weft
