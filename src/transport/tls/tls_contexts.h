// The proxy's TLS material, loaded once per certificate generation and shared, immutable, by
// every connection that starts while it is current. Rotation builds a new TlsContexts; live
// connections keep the one they started with (an SSL holds a reference to its SSL_CTX).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <boost/asio/ssl/context.hpp>

#include "config/proxy_config.h"
#include "core/result.h"
#include "identity/certificate_info.h"

namespace weft {

struct TlsContexts {
  std::shared_ptr<boost::asio::ssl::context> server;  // inbound HBONE: requires a client cert
  std::shared_ptr<boost::asio::ssl::context> client;  // outbound HBONE: presents our cert
  CertificateInfo leaf;
  CertificateInfo ca;
  std::string spiffe_id;
  std::string trust_domain;
  uint64_t generation = 0;
};

// An identity as PEM text: from files, or handed over by the agent's SDS socket. The names say
// where each part came from, for errors.
struct IdentityMaterial {
  std::string cert_pem, key_pem, ca_pem;  // cert_pem: the leaf, then any intermediates
  std::string cert_name, key_name, ca_name;
};

// Loads cert, key and CA; checks that the key matches, that the certificate chains to the CA,
// is currently valid and carries a SPIFFE ID. Errors name the file and what to fix.
Result<std::shared_ptr<const TlsContexts>> load_tls_contexts(const IdentityConfig& identity,
                                                             uint64_t generation);
// The same from PEM text. `trust_domain` empty: taken from the certificate's SPIFFE ID.
Result<std::shared_ptr<const TlsContexts>> make_tls_contexts(const IdentityMaterial& material,
                                                             const std::string& trust_domain,
                                                             uint64_t generation);

// The verified peer's SPIFFE ID (first spiffe:// URI SAN of its leaf), if any.
std::optional<std::string> peer_spiffe_id(SSL* ssl);

}  // namespace weft
