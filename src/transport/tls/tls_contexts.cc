#include "transport/tls/tls_contexts.h"

#include <openssl/crypto.h>
#include <openssl/pem.h>

#include <openssl/ssl.h>
#include <fstream>
#include <sstream>

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
                                                   const IdentityMaterial& id) {
  auto ctx = std::make_shared<ssl::context>(method);
  SSL_CTX* raw = ctx->native_handle();
  SSL_CTX_set_min_proto_version(raw, TLS1_3_VERSION);
  SSL_CTX_set_mode(raw, SSL_MODE_RELEASE_BUFFERS);  // idle connections keep no TLS buffers
  // AES-128-GCM first, as BoringSSL (Envoy, Istio) orders it on CPUs with AES instructions: the
  // same TLS 1.3 security level for mesh traffic at about three quarters of AES-256's cost.
  SSL_CTX_set_ciphersuites(
      raw, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
  SSL_CTX_set_options(raw, SSL_OP_CIPHER_SERVER_PREFERENCE);
  {
    ossl::Bio bio(BIO_new_mem_buf(id.cert_pem.data(), static_cast<int>(id.cert_pem.size())));
    ossl::Cert leaf(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!leaf || SSL_CTX_use_certificate(raw, leaf.get()) != 1)
      return make_error("cannot load certificate " + id.cert_name + ": " + ossl::last_error());
    while (X509* extra = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr))
      SSL_CTX_add0_chain_cert(raw, extra);  // intermediates; the context owns them
    ERR_clear_error();                      // the end of the PEM text reads as an error
  }
  {
    ossl::Bio bio(BIO_new_mem_buf(id.key_pem.data(), static_cast<int>(id.key_pem.size())));
    ossl::Key key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
    if (!key || SSL_CTX_use_PrivateKey(raw, key.get()) != 1)
      return make_error("cannot load private key " + id.key_name + ": " + ossl::last_error());
  }
  if (SSL_CTX_check_private_key(raw) != 1)
    return make_error("private key " + id.key_name + " does not match certificate " + id.cert_name);
  {
    ossl::Bio bio(BIO_new_mem_buf(id.ca_pem.data(), static_cast<int>(id.ca_pem.size())));
    X509_STORE* store = SSL_CTX_get_cert_store(raw);
    int roots = 0;
    while (X509* root = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
      X509_STORE_add_cert(store, root);
      X509_free(root);
      ++roots;
    }
    ERR_clear_error();
    if (roots == 0) return make_error("no PEM certificate in CA bundle " + id.ca_name);
  }
  return ctx;
}

Result<std::string> slurp(const std::filesystem::path& p, const char* what) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return make_error(std::string("cannot read ") + what + " " + p.string());
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace

Result<std::shared_ptr<const TlsContexts>> load_tls_contexts(const IdentityConfig& config,
                                                             uint64_t generation) {
  IdentityMaterial m;
  m.cert_name = config.cert.string();
  m.key_name = config.key.string();
  m.ca_name = config.ca.string();
  auto cert = slurp(config.cert, "certificate");
  if (!cert) return make_error(cert.error());
  auto key = slurp(config.key, "private key");
  if (!key) return make_error(key.error());
  auto ca = slurp(config.ca, "CA bundle");
  if (!ca) return make_error(ca.error());
  m.cert_pem = std::move(*cert);
  m.key_pem = std::move(*key);
  m.ca_pem = std::move(*ca);
  auto out = make_tls_contexts(m, config.trust_domain, generation);
  OPENSSL_cleanse(m.key_pem.data(), m.key_pem.size());
  return out;
}

Result<std::shared_ptr<const TlsContexts>> make_tls_contexts(const IdentityMaterial& id,
                                                             const std::string& trust_domain,
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
  auto ca = parse_certificate_info(id.ca_pem, "CA bundle " + id.ca_name);
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
    return make_error("certificate " + id.cert_name + " does not verify against CA " + id.ca_name +
                      ": " + X509_verify_cert_error_string(verr));

  auto spiffe = out->leaf.spiffe_id();
  if (!spiffe)
    return make_error("certificate " + id.cert_name +
                      " has no spiffe:// URI SAN; issue it with 'weft cert issue --spiffe-id ...'");
  out->spiffe_id = *spiffe;
  auto td = spiffe_trust_domain(*spiffe);
  if (!td) return make_error("certificate " + id.cert_name + ": " + td.error());
  out->trust_domain = trust_domain.empty() ? *td : trust_domain;
  return std::shared_ptr<const TlsContexts>(std::move(out));
}

std::optional<std::string> peer_spiffe_id(SSL* ssl) {
  X509* peer = SSL_get0_peer_certificate(ssl);
  if (!peer) return std::nullopt;
  return describe_certificate(peer).spiffe_id();
}

}  // namespace weft
