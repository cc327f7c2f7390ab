#include "transport/tls/tls_contexts.h"

#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "identity/openssl_ptr.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace ssl = boost::asio::ssl;

namespace {

constexpr unsigned char kAlpnH2[] = {2, 'h', '2'};

int select_h2(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
              unsigned int inlen, void*) {
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, outlen, kAlpnH2, sizeof kAlpnH2, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_ALERT_FATAL;  // HBONE speaks h2 only; refuse rather than guess
  *out = selected;
  return SSL_TLSEXT_ERR_OK;
}

Result<std::shared_ptr<ssl::context>> make_context(ssl::context::method method,
                                                   const IdentityConfig& id) {
  auto ctx = std::make_shared<ssl::context>(method);
  SSL_CTX* raw = ctx->native_handle();
  SSL_CTX_set_min_proto_version(raw, TLS1_3_VERSION);
  SSL_CTX_set_mode(raw, SSL_MODE_RELEASE_BUFFERS);  // idle connections keep no TLS buffers
  // AES-128-GCM first, as BoringSSL (Envoy, Istio) orders it on CPUs with AES instructions: the
  // same TLS 1.3 security level for mesh traffic at about three quarters of AES-256's cost.
  SSL_CTX_set_ciphersuites(
      raw, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
  SSL_CTX_set_options(raw, SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (SSL_CTX_use_certificate_chain_file(raw, id.cert.c_str()) != 1)
    return make_error("cannot load certificate " + id.cert.string() + ": " + ossl::last_error());
  if (SSL_CTX_use_PrivateKey_file(raw, id.key.c_str(), SSL_FILETYPE_PEM) != 1)
    return make_error("cannot load private key " + id.key.string() + ": " + ossl::last_error());
  if (SSL_CTX_check_private_key(raw) != 1)
    return make_error("private key " + id.key.string() + " does not match certificate " +
                      id.cert.string());
  if (SSL_CTX_load_verify_locations(raw, id.ca.c_str(), nullptr) != 1)
    return make_error("cannot load CA bundle " + id.ca.string() + ": " + ossl::last_error());
  return ctx;
}

}  // namespace

Result<std::shared_ptr<const TlsContexts>> load_tls_contexts(const IdentityConfig& id,
                                                             uint64_t generation) {
  auto out = std::make_shared<TlsContexts>();
  out->generation = generation;
  auto server = make_context(ssl::context::tls_server, id);
  if (!server) return make_error(server.error());
  auto client = make_context(ssl::context::tls_client, id);
  if (!client) return make_error(client.error());
  out->server = *server;
  out->client = *client;

  SSL_CTX_set_verify((*server)->native_handle(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     nullptr);
  SSL_CTX_set_alpn_select_cb((*server)->native_handle(), select_h2, nullptr);
  // Tunnels are long-lived and pooled; resumption tickets would only cost bytes and a key.
  SSL_CTX_set_num_tickets((*server)->native_handle(), 0);
  SSL_CTX_set_verify((*client)->native_handle(), SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_alpn_protos((*client)->native_handle(), kAlpnH2, sizeof kAlpnH2);

  X509* leaf = SSL_CTX_get0_certificate((*server)->native_handle());
  out->leaf = describe_certificate(leaf);
  auto ca = load_certificate_info(id.ca);
  if (!ca) return make_error(ca.error());
  out->ca = *ca;

  // The certificate must chain to our own CA and be valid now: a proxy that would fail every
  // handshake must not report ready.
  X509_STORE* store = SSL_CTX_get_cert_store((*server)->native_handle());
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs((*server)->native_handle(), &chain);
  X509_STORE_CTX* vctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(vctx, store, leaf, chain);
  const int ok = X509_verify_cert(vctx);
  const int verr = X509_STORE_CTX_get_error(vctx);
  X509_STORE_CTX_free(vctx);
  if (ok != 1)
    return make_error("certificate " + id.cert.string() + " does not verify against CA " +
                      id.ca.string() + ": " + X509_verify_cert_error_string(verr));

  auto spiffe = out->leaf.spiffe_id();
  if (!spiffe)
    return make_error("certificate " + id.cert.string() +
                      " has no spiffe:// URI SAN; issue it with 'weft cert issue --spiffe-id ...'");
  out->spiffe_id = *spiffe;
  auto td = spiffe_trust_domain(*spiffe);
  if (!td) return make_error("certificate " + id.cert.string() + ": " + td.error());
  out->trust_domain = id.trust_domain.empty() ? *td : id.trust_domain;
  return std::shared_ptr<const TlsContexts>(std::move(out));
}

std::optional<std::string> peer_spiffe_id(SSL* ssl) {
  X509* peer = SSL_get0_peer_certificate(ssl);
  if (!peer) return std::nullopt;
  return describe_certificate(peer).spiffe_id();
}

}  // namespace weft
