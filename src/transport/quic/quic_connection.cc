#include "transport/quic/quic_connection.h"

#include <gnutls/gnutls.h>
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "identity/certificate_info.h"
#include "identity/openssl_ptr.h"
#include "identity/spiffe_id.h"

namespace weft::quic {

namespace {

constexpr char kAlpn[] = "weft-p2p/1";
// TLS 1.3 only (QUIC requires it), AEADs QUIC defines, no middlebox compatibility mode.
constexpr char kPriority[] =
    "%DISABLE_TLS13_COMPAT_MODE:NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
    "+AES-256-GCM:+CHACHA20-POLY1305:-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1";
// Largest GSO batch: the kernel takes at most 64 segments and 64 KiB per send.
constexpr size_t kMaxBatchBytes = 60000;

ngtcp2_tstamp now_ts() {
  return static_cast<ngtcp2_tstamp>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

uint64_t to_ns(Millis d) { return static_cast<uint64_t>(d.count()) * NGTCP2_MILLISECONDS; }

// Every connection has one fixed path as far as ngtcp2 knows; the endpoint below decides
// where packets really go. Documentation addresses (RFC 5737), never on the wire.
struct VirtualPath {
  sockaddr_in local{}, remote{};
  ngtcp2_path path{};
  VirtualPath() {
    local.sin_family = remote.sin_family = AF_INET;
    local.sin_addr.s_addr = htonl(0xC0000201);   // 192.0.2.1
    remote.sin_addr.s_addr = htonl(0xC0000202);  // 192.0.2.2
    local.sin_port = remote.sin_port = htons(443);
    path.local = {reinterpret_cast<ngtcp2_sockaddr*>(&local), sizeof local};
    path.remote = {reinterpret_cast<ngtcp2_sockaddr*>(&remote), sizeof remote};
  }
};
const ngtcp2_path* virtual_path() {
  static const VirtualPath p;
  return &p.path;
}

void random_bytes(uint8_t* out, size_t len) { RAND_bytes(out, static_cast<int>(len)); }

void on_rand(uint8_t* dest, size_t len, const ngtcp2_rand_ctx*) { random_bytes(dest, len); }

ngtcp2_cid random_cid() {
  ngtcp2_cid cid;
  cid.datalen = kCidLength;
  random_bytes(cid.data, cid.datalen);
  return cid;
}

std::string cid_key(const ngtcp2_cid& cid) {
  return std::string(reinterpret_cast<const char*>(cid.data), cid.datalen);
}

int gnutls_verify(gnutls_session_t session) {
  auto* ref = static_cast<ngtcp2_crypto_conn_ref*>(gnutls_session_get_ptr(session));
  return static_cast<Connection*>(ref->user_data)->verify_peer(session);
}

}  // namespace

// ---------------------------------------------------------------- QuicTls

Result<std::shared_ptr<QuicTls>> QuicTls::create(const std::string& cert_pem,
                                                 const std::string& key_pem,
                                                 const std::string& ca_pem,
                                                 const std::string& trust_domain) {
  std::shared_ptr<QuicTls> t(new QuicTls());
  t->ca_pem_ = ca_pem;
  t->trust_domain_ = trust_domain;
  if (gnutls_certificate_allocate_credentials(&t->cred_) != GNUTLS_E_SUCCESS)
    return make_error("QUIC: cannot allocate TLS credentials");
  gnutls_datum_t cert{reinterpret_cast<unsigned char*>(const_cast<char*>(cert_pem.data())),
                      static_cast<unsigned>(cert_pem.size())};
  gnutls_datum_t key{reinterpret_cast<unsigned char*>(const_cast<char*>(key_pem.data())),
                     static_cast<unsigned>(key_pem.size())};
  const int rv =
      gnutls_certificate_set_x509_key_mem2(t->cred_, &cert, &key, GNUTLS_X509_FMT_PEM, nullptr, 0);
  if (rv < 0)
    return make_error(std::string("QUIC: the node certificate or key is unusable: ") +
                      gnutls_strerror(rv));
  gnutls_certificate_set_verify_function(t->cred_, gnutls_verify);
  return t;
}

QuicTls::~QuicTls() {
  if (cred_) gnutls_certificate_free_credentials(cred_);
}

Result<QuicTls::Peer> QuicTls::verify(const std::vector<std::string>& der_chain) const {
  if (der_chain.empty()) return make_error("the peer presented no certificate");
  auto parse = [](const std::string& der) {
    const auto* p = reinterpret_cast<const unsigned char*>(der.data());
    return ossl::Cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  };
  ossl::Cert leaf = parse(der_chain[0]);
  if (!leaf) return make_error("the peer certificate is not valid DER");
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(), X509_STORE_free);
  ossl::Bio bio(BIO_new_mem_buf(ca_pem_.data(), static_cast<int>(ca_pem_.size())));
  while (X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store.get(), ca);
    X509_free(ca);
  }
  ERR_clear_error();
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> untrusted(
      sk_X509_new_null(), [](STACK_OF(X509) * s) { sk_X509_pop_free(s, X509_free); });
  for (size_t i = 1; i < der_chain.size(); ++i)
    if (auto c = parse(der_chain[i])) sk_X509_push(untrusted.get(), c.release());
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx(X509_STORE_CTX_new(),
                                                                      X509_STORE_CTX_free);
  X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), untrusted.get());
  if (X509_verify_cert(ctx.get()) != 1)
    return make_error(std::string("the peer certificate does not chain to the mesh CA: ") +
                      X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())));
  Peer peer;
  const auto id = describe_certificate(leaf.get()).spiffe_id();
  const auto td = id ? spiffe_trust_domain(*id) : Result<std::string>(make_error("none"));
  if (!id || !td || *td != trust_domain_)
    return make_error("the peer certificate has no SPIFFE ID of trust domain " + trust_domain_ +
                      (id ? " (it has " + *id + ")" : ""));
  peer.spiffe_id = *id;
  EVP_PKEY* pk = X509_get0_pubkey(leaf.get());
  size_t len = peer.key.size();
  if (!pk || EVP_PKEY_id(pk) != EVP_PKEY_ED25519 ||
      EVP_PKEY_get_raw_public_key(pk, peer.key.data(), &len) != 1 || len != peer.key.size())
    return make_error("the peer certificate's key is not an Ed25519 node key");
  return peer;
}

// ---------------------------------------------------------------- Connection

Connection::Connection(boost::asio::io_context& io, std::shared_ptr<const QuicTls> tls, Role role,
                       const Settings& settings, const std::array<uint8_t, 32>& expected_key,
                       Send send, Hooks hooks)
    : io_(io),
      tls_(std::move(tls)),
      role_(role),
      settings_(settings),
      expected_key_(expected_key),
      send_(std::move(send)),
      hooks_(std::move(hooks)),
      conn_ref_(std::make_unique<ngtcp2_crypto_conn_ref>()),
      timer_(io) {
  conn_ref_->get_conn = &Connection::get_conn;
  conn_ref_->user_data = this;
  batch_.resize(kMaxBatchBytes + 2048);
}

Connection::~Connection() {
  if (conn_) ngtcp2_conn_del(conn_);
  if (session_) gnutls_deinit(session_);
}

ngtcp2_conn* Connection::get_conn(ngtcp2_crypto_conn_ref* ref) {
  return static_cast<Connection*>(ref->user_data)->conn_;
}

namespace {

void fill_callbacks(ngtcp2_callbacks& cb, bool client) {
  cb = {};
  if (client) {
    cb.client_initial = ngtcp2_crypto_client_initial_cb;
    cb.recv_retry = ngtcp2_crypto_recv_retry_cb;
  } else {
    cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
  }
  cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb;
  cb.encrypt = ngtcp2_crypto_encrypt_cb;
  cb.decrypt = ngtcp2_crypto_decrypt_cb;
  cb.hp_mask = ngtcp2_crypto_hp_mask_cb;
  cb.rand = on_rand;
  cb.update_key = ngtcp2_crypto_update_key_cb;
  cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb;
  cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb;
  cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb;
  cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb;
}

// WEFT_QUIC_LOG=1 prints ngtcp2's own packet log to stderr, for debugging handshakes.
void quic_log(void*, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
}

void fill_settings(ngtcp2_settings& s, ngtcp2_transport_params& p, const Settings& o,
                   const Connection::Hooks& hooks) {
  ngtcp2_settings_default(&s);
  static const bool log = std::getenv("WEFT_QUIC_LOG") != nullptr;
  if (log) s.log_printf = quic_log;
  s.initial_ts = now_ts();
  // BBR paces and sizes its window from measured bandwidth and minimum RTT. Cubic (and Reno)
  // in this ngtcp2 cap the window at 2.89 x delivery rate x minimum RTT, so a path whose RTT
  // grows under load (the relay's TCP legs) stalls it: the P2P bench measured 0.54-0.62
  // Gbit/s over the relay with Cubic and 0.70-0.71 with BBRv2 (same datagram size), and
  // 1.6-1.9 vs 1.8-2.0 direct.
  s.cc_algo = NGTCP2_CC_ALGO_BBR2;
  if (hooks.max_datagram) {
    // The owner sizes each write to its path; ngtcp2 must not shape it to the probed MTU of
    // the one virtual path it sees (nor probe that path, whose size means nothing).
    s.no_tx_udp_payload_size_shaping = 1;
    s.max_tx_udp_payload_size = kMaxDatagram;
    s.no_pmtud = 1;
  }
  s.max_window = o.conn_window;
  s.max_stream_window = o.stream_window;
  s.handshake_timeout = to_ns(o.handshake_timeout);
  ngtcp2_transport_params_default(&p);
  p.initial_max_stream_data_bidi_local = 1u << 20;
  p.initial_max_stream_data_bidi_remote = 1u << 20;
  p.initial_max_data = 4u << 20;
  p.initial_max_streams_bidi = o.max_streams;
  p.initial_max_streams_uni = 0;
  p.max_idle_timeout = to_ns(o.idle_timeout);
  p.active_connection_id_limit = 4;
}

}  // namespace

Result<std::shared_ptr<Connection>> Connection::client(boost::asio::io_context& io,
                                                       std::shared_ptr<const QuicTls> tls,
                                                       const Settings& settings,
                                                       const std::array<uint8_t, 32>& expected_key,
                                                       Send send, Hooks hooks) {
  std::shared_ptr<Connection> c(new Connection(io, std::move(tls), Role::client, settings,
                                               expected_key, std::move(send), std::move(hooks)));
  ngtcp2_callbacks cb;
  fill_callbacks(cb, true);
  cb.handshake_completed = &Connection::on_handshake_completed;
  cb.recv_stream_data = &Connection::on_recv_stream_data;
  cb.acked_stream_data_offset = &Connection::on_acked;
  cb.stream_open = &Connection::on_stream_open;
  cb.stream_close = &Connection::on_stream_close;
  cb.stream_reset = &Connection::on_stream_reset;
  cb.extend_max_stream_data = &Connection::on_extend_max_stream_data;
  cb.get_new_connection_id = &Connection::on_new_cid;
  cb.recv_stateless_reset = &Connection::on_stateless_reset;
  cb.remove_connection_id = &Connection::on_remove_cid;
  ngtcp2_settings s;
  ngtcp2_transport_params p;
  fill_settings(s, p, settings, c->hooks_);
  const ngtcp2_cid dcid = random_cid(), scid = random_cid();
  if (int rv = ngtcp2_conn_client_new(&c->conn_, &dcid, &scid, virtual_path(), NGTCP2_PROTO_VER_V1,
                                      &cb, &s, &p, nullptr, c.get());
      rv != 0)
    return make_error(std::string("QUIC: cannot create a connection: ") + ngtcp2_strerror(rv));
  if (auto ok = c->init_tls(); !ok) return make_error(ok.error());
  ngtcp2_conn_set_keep_alive_timeout(c->conn_, to_ns(settings.keepalive));
  if (c->hooks_.on_cid) c->hooks_.on_cid(*c, cid_key(scid), true);
  return c;
}

Result<std::shared_ptr<Connection>> Connection::server(boost::asio::io_context& io,
                                                       std::shared_ptr<const QuicTls> tls,
                                                       const Settings& settings,
                                                       const std::array<uint8_t, 32>& expected_key,
                                                       const uint8_t* initial, size_t len,
                                                       Send send, Hooks hooks) {
  ngtcp2_pkt_hd hd;
  if (ngtcp2_accept(&hd, initial, len) != 0)
    return make_error("not a QUIC Initial packet a server can accept");
  std::shared_ptr<Connection> c(new Connection(io, std::move(tls), Role::server, settings,
                                               expected_key, std::move(send), std::move(hooks)));
  ngtcp2_callbacks cb;
  fill_callbacks(cb, false);
  cb.handshake_completed = &Connection::on_handshake_completed;
  cb.recv_stream_data = &Connection::on_recv_stream_data;
  cb.acked_stream_data_offset = &Connection::on_acked;
  cb.stream_open = &Connection::on_stream_open;
  cb.stream_close = &Connection::on_stream_close;
  cb.stream_reset = &Connection::on_stream_reset;
  cb.extend_max_stream_data = &Connection::on_extend_max_stream_data;
  cb.get_new_connection_id = &Connection::on_new_cid;
  cb.recv_stateless_reset = &Connection::on_stateless_reset;
  cb.remove_connection_id = &Connection::on_remove_cid;
  ngtcp2_settings s;
  ngtcp2_transport_params p;
  fill_settings(s, p, settings, c->hooks_);
  p.original_dcid = hd.dcid;
  const ngtcp2_cid scid = random_cid();
  if (settings.reset_secret) {
    const auto t = stateless_reset_token(*settings.reset_secret, scid.data, scid.datalen);
    std::memcpy(p.stateless_reset_token, t.data(), t.size());
    p.stateless_reset_token_present = 1;
  }
  if (int rv = ngtcp2_conn_server_new(&c->conn_, &hd.scid, &scid, virtual_path(), hd.version, &cb,
                                      &s, &p, nullptr, c.get());
      rv != 0)
    return make_error(std::string("QUIC: cannot accept a connection: ") + ngtcp2_strerror(rv));
  if (auto ok = c->init_tls(); !ok) return make_error(ok.error());
  ngtcp2_conn_set_keep_alive_timeout(c->conn_, to_ns(settings.keepalive));
  if (c->hooks_.on_cid) {
    // The client's chosen ID routes its retransmitted Initials until it learns ours.
    c->hooks_.on_cid(*c, cid_key(hd.dcid), true);
    c->hooks_.on_cid(*c, cid_key(scid), true);
  }
  return c;
}

Result<bool> Connection::init_tls() {
  const unsigned flags =
      (role_ == Role::client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NO_END_OF_EARLY_DATA;
  if (gnutls_init(&session_, flags) != GNUTLS_E_SUCCESS)
    return make_error("QUIC: cannot create a TLS session");
  const char* err = nullptr;
  if (gnutls_priority_set_direct(session_, kPriority, &err) != GNUTLS_E_SUCCESS)
    return make_error(std::string("QUIC: TLS priority rejected at ") + (err ? err : "?"));
  const int rv = role_ == Role::client ? ngtcp2_crypto_gnutls_configure_client_session(session_)
                                       : ngtcp2_crypto_gnutls_configure_server_session(session_);
  if (rv != 0) return make_error("QUIC: cannot configure the TLS session for QUIC");
  gnutls_session_set_ptr(session_, conn_ref_.get());
  if (gnutls_credentials_set(session_, GNUTLS_CRD_CERTIFICATE, tls_->credentials()) !=
      GNUTLS_E_SUCCESS)
    return make_error("QUIC: cannot set TLS credentials");
  gnutls_datum_t alpn{reinterpret_cast<unsigned char*>(const_cast<char*>(kAlpn)),
                      sizeof(kAlpn) - 1};
  gnutls_alpn_set_protocols(session_, &alpn, 1, GNUTLS_ALPN_MANDATORY);
  if (role_ == Role::server) gnutls_certificate_server_set_request(session_, GNUTLS_CERT_REQUIRE);
  ngtcp2_conn_set_tls_native_handle(conn_, session_);
  return true;
}

int Connection::verify_peer(gnutls_session_int* session) {
  unsigned n = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(session, &n);
  std::vector<std::string> der;
  for (unsigned i = 0; certs && i < n; ++i)
    der.emplace_back(reinterpret_cast<const char*>(certs[i].data), certs[i].size);
  auto peer = tls_->verify(der);
  if (!peer) {
    close_reason_ = "peer certificate rejected: " + peer.error();
    return -1;
  }
  if (peer->key != expected_key_) {
    close_reason_ = "peer certificate rejected: " + peer->spiffe_id +
                    " is not the node whose key the packets came from";
    return -1;
  }
  peer_identity_ = peer->spiffe_id;
  return 0;
}

// ---------------------------------------------------------------- packets in and out

void Connection::on_datagram(const uint8_t* data, size_t len) {
  if (closed_) return;
  ngtcp2_pkt_info pi{};
  const int rv = ngtcp2_conn_read_pkt(conn_, virtual_path(), &pi, data, len, now_ts());
  if (rv == 0) return schedule_flush();
  if (rv == NGTCP2_ERR_DRAINING) {
    ngtcp2_connection_close_error ccerr;
    ngtcp2_conn_get_connection_close_error(conn_, &ccerr);
    std::string why = "closed by the peer";
    if (ccerr.reasonlen)
      why += ": " + std::string(reinterpret_cast<const char*>(ccerr.reason), ccerr.reasonlen);
    if (!close_reason_.empty()) why = close_reason_;  // a stateless reset says more
    return finish_close(why);
  }
  if (rv == NGTCP2_ERR_DROP_CONN) return finish_close("dropped by QUIC");
  std::string why = close_reason_;
  if (why.empty()) why = std::string("QUIC error: ") + ngtcp2_strerror(rv);
  fail(why, true);
}

void Connection::schedule_flush() {
  if (flush_scheduled_ || closed_) return;
  flush_scheduled_ = true;
  boost::asio::post(io_, [weak = weak_from_this()] {
    if (auto self = weak.lock()) {
      self->flush_scheduled_ = false;
      self->flush();
    }
  });
}

void Connection::send_batch(const uint8_t* data, size_t len, size_t segment) {
  if (len) send_(data, len, segment);
}

void Connection::flush() {
  if (closed_ || in_flush_) return;
  in_flush_ = true;
  const ngtcp2_tstamp ts = now_ts();
  const size_t max_udp = hooks_.max_datagram
                             ? std::clamp(hooks_.max_datagram(), kMinDatagram, kMaxDatagram)
                             : ngtcp2_conn_get_path_max_tx_udp_payload_size(conn_);
  size_t used = 0, segment = 0;
  ngtcp2_pkt_info pi{};
  for (;;) {
    int64_t sid = -1;
    Stream* st = nullptr;
    while (!ready_.empty()) {
      auto it = streams_.find(ready_.front());
      const bool has_work =
          it != streams_.end() && !it->second.blocked &&
          (it->second.sent < it->second.written || (it->second.fin_wanted && !it->second.fin_sent));
      if (has_work) {
        sid = it->first;
        st = &it->second;
        break;
      }
      if (it != streams_.end()) it->second.queued = false;
      ready_.pop_front();
    }
    ngtcp2_vec vec[8];
    size_t nvec = 0;
    uint32_t flags = NGTCP2_WRITE_STREAM_FLAG_NONE;
    if (st) {
      flags = NGTCP2_WRITE_STREAM_FLAG_MORE;
      uint64_t pos = st->base;
      for (auto& chunk : st->sendq) {
        if (nvec == 8) break;
        const uint64_t end = pos + chunk.size();
        if (end > st->sent) {
          const size_t skip = st->sent > pos ? static_cast<size_t>(st->sent - pos) : 0;
          vec[nvec++] = {chunk.data() + skip, chunk.size() - skip};
        }
        pos = end;
      }
      if (st->fin_wanted && pos == st->written) flags |= NGTCP2_WRITE_STREAM_FLAG_FIN;
    }
    ngtcp2_ssize datalen = -1;
    const ngtcp2_ssize n =
        ngtcp2_conn_writev_stream(conn_, nullptr, &pi, batch_.data() + used, max_udp, &datalen,
                                  flags, sid, nvec ? vec : nullptr, nvec, ts);
    if (st && datalen >= 0) {
      st->sent += static_cast<uint64_t>(datalen);
      if ((flags & NGTCP2_WRITE_STREAM_FLAG_FIN) && st->sent == st->written) st->fin_sent = true;
    }
    if (n < 0) {
      if (n == NGTCP2_ERR_WRITE_MORE) {
        ready_.push_back(ready_.front());  // the packet has room: let the next stream fill it
        ready_.pop_front();
        continue;
      }
      if (st && (n == NGTCP2_ERR_STREAM_DATA_BLOCKED || n == NGTCP2_ERR_STREAM_SHUT_WR ||
                 n == NGTCP2_ERR_STREAM_NOT_FOUND)) {
        if (n == NGTCP2_ERR_STREAM_DATA_BLOCKED) st->blocked = true;
        st->queued = false;
        ready_.pop_front();
        continue;
      }
      in_flush_ = false;
      return fail(std::string("QUIC error: ") + ngtcp2_strerror(static_cast<int>(n)), true);
    }
    if (n == 0) break;
    const size_t len = static_cast<size_t>(n);
    if (segment == 0) {
      segment = len;
    } else if (len > segment) {
      // Only the last segment of a GSO batch may differ, and only by being shorter.
      send_batch(batch_.data(), used, segment);
      std::memmove(batch_.data(), batch_.data() + used, len);
      used = 0;
      segment = len;
    }
    used += len;
    if (len < segment || used + max_udp > kMaxBatchBytes) {
      send_batch(batch_.data(), used, segment);
      used = 0;
      segment = 0;
    }
    if (st && !ready_.empty() && ready_.front() == sid) {
      ready_.push_back(sid);  // round robin between streams, packet by packet
      ready_.pop_front();
    }
  }
  send_batch(batch_.data(), used, segment);
  ngtcp2_conn_update_pkt_tx_time(conn_, ts);
  in_flush_ = false;
  arm_timer();
}

void Connection::arm_timer() {
  if (closed_) return;
  const ngtcp2_tstamp expiry = ngtcp2_conn_get_expiry(conn_);
  if (expiry == UINT64_MAX) return;
  // Re-arming costs a timerfd_settime system call; at tens of thousands of packets a second
  // that was a third of the agent's time. A wait that fires no later than needed stays: firing
  // early is harmless (handle_expiry finds nothing due, and the flush re-arms).
  if (timer_armed_ && armed_expiry_ <= expiry) return;
  const ngtcp2_tstamp now = now_ts();
  if (expiry <= now) {
    // Already due (an acknowledgement to send, a pacing slot that has come): a zero-length
    // wait would still cost timerfd_settime calls, and a receiver at full rate made tens of
    // thousands a second. Run it after the handlers already queued instead.
    if (!expiry_posted_) {
      expiry_posted_ = true;
      boost::asio::post(io_, [weak = weak_from_this()] {
        if (auto self = weak.lock()) {
          self->expiry_posted_ = false;
          self->on_timer();
        }
      });
    }
    return;
  }
  timer_armed_ = true;
  armed_expiry_ = expiry;
  const uint64_t generation = ++timer_generation_;
  timer_.expires_after(std::chrono::nanoseconds(expiry > now ? expiry - now : 0));
  timer_.async_wait([weak = weak_from_this(), generation](const boost::system::error_code& ec) {
    auto self = weak.lock();
    if (!self) return;
    if (generation == self->timer_generation_) self->timer_armed_ = false;
    if (!ec) self->on_timer();
  });
}

void Connection::on_timer() {
  if (closed_) return;
  const int rv = ngtcp2_conn_handle_expiry(conn_, now_ts());
  if (rv == NGTCP2_ERR_IDLE_CLOSE) return finish_close("idle timeout");
  if (rv == NGTCP2_ERR_HANDSHAKE_TIMEOUT) return finish_close("handshake timed out");
  if (rv != 0) return fail(std::string("QUIC error: ") + ngtcp2_strerror(rv), true);
  flush();
}

void Connection::close(const std::string& why) {
  if (!closed_) fail(why, true);
}

void Connection::fail(const std::string& why, bool send_close) {
  if (closed_) return;
  if (send_close && conn_ && !ngtcp2_conn_is_in_closing_period(conn_) &&
      !ngtcp2_conn_is_in_draining_period(conn_)) {
    ngtcp2_connection_close_error ccerr;
    ngtcp2_connection_close_error_default(&ccerr);
    if (!established_ && ngtcp2_conn_get_tls_alert(conn_))
      ngtcp2_connection_close_error_set_transport_error_tls_alert(
          &ccerr, ngtcp2_conn_get_tls_alert(conn_), nullptr, 0);
    else
      ngtcp2_connection_close_error_set_application_error(
          &ccerr, 0, reinterpret_cast<const uint8_t*>(why.data()),
          std::min<size_t>(why.size(), 100));
    ngtcp2_pkt_info pi{};
    const ngtcp2_ssize n = ngtcp2_conn_write_connection_close(conn_, nullptr, &pi, batch_.data(),
                                                              batch_.size(), &ccerr, now_ts());
    if (n > 0) send_batch(batch_.data(), static_cast<size_t>(n), static_cast<size_t>(n));
  }
  finish_close(why);
}

void Connection::finish_close(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  close_reason_ = why;
  timer_.cancel();
  auto self = shared_from_this();  // hooks may drop the last other reference
  auto streams = std::move(streams_);
  streams_.clear();
  ready_.clear();
  for (auto& [id, s] : streams)
    if (auto* h = std::exchange(s.handler, nullptr)) h->on_closed("QUIC connection closed: " + why);
  if (hooks_.on_cid)
    for (const auto& cid : cids()) hooks_.on_cid(*this, cid, false);
  if (hooks_.on_closed) hooks_.on_closed(*this, why);
}

std::vector<std::string> Connection::cids() const {
  std::vector<std::string> out;
  if (!conn_) return out;
  std::vector<ngtcp2_cid> ids(ngtcp2_conn_get_num_scid(conn_));
  ngtcp2_conn_get_scid(conn_, ids.data());
  for (const auto& c : ids) out.push_back(cid_key(c));
  return out;
}

std::chrono::microseconds Connection::smoothed_rtt() const {
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(conn_, &st);
  return std::chrono::microseconds(st.smoothed_rtt / 1000);
}

Connection::Congestion Connection::congestion() const {
  if (!conn_) return {};
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(conn_, &st);
  return {st.cwnd, st.bytes_in_flight, st.delivery_rate_sec};
}

size_t Connection::unanswered_probe_timeouts() const {
  if (!conn_ || closed_) return 0;
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(conn_, &st);
  return st.bytes_in_flight > 0 ? st.pto_count : 0;
}

// ---------------------------------------------------------------- streams

int64_t Connection::open_stream(StreamHandler* handler) {
  if (closed_ || !established_) return -1;
  int64_t id = -1;
  if (ngtcp2_conn_open_bidi_stream(conn_, &id, nullptr) != 0) return -1;
  streams_[id].handler = handler;
  return id;
}

size_t Connection::room(int64_t id) const {
  auto it = streams_.find(id);
  if (it == streams_.end() || it->second.fin_wanted) return 0;
  const uint64_t held = it->second.written - it->second.acked;
  return held >= settings_.stream_send_buffer
             ? 0
             : static_cast<size_t>(settings_.stream_send_buffer - held);
}

size_t Connection::write(int64_t id, const uint8_t* data, size_t len) {
  auto it = streams_.find(id);
  if (closed_ || it == streams_.end() || it->second.fin_wanted) return 0;
  len = std::min(len, room(id));
  if (len == 0) return 0;
  it->second.sendq.emplace_back(data, data + len);
  it->second.written += len;
  mark_ready(id);
  schedule_flush();
  return len;
}

void Connection::shutdown_write(int64_t id) {
  auto it = streams_.find(id);
  if (closed_ || it == streams_.end() || it->second.fin_wanted) return;
  it->second.fin_wanted = true;
  mark_ready(id);
  schedule_flush();
}

void Connection::consume(int64_t id, size_t len) {
  if (closed_ || len == 0) return;
  ngtcp2_conn_extend_max_stream_offset(conn_, id, len);
  ngtcp2_conn_extend_max_offset(conn_, len);
  schedule_flush();
}

void Connection::reset(int64_t id, uint64_t code) {
  auto it = streams_.find(id);
  if (closed_ || it == streams_.end()) return;
  it->second.handler = nullptr;
  ngtcp2_conn_shutdown_stream(conn_, id, code);
  schedule_flush();
}

void Connection::detach(int64_t id) {
  if (auto it = streams_.find(id); it != streams_.end()) it->second.handler = nullptr;
}

void Connection::mark_ready(int64_t id) {
  auto& s = streams_[id];
  if (s.queued || s.blocked) return;
  s.queued = true;
  ready_.push_back(id);
}

// ---------------------------------------------------------------- ngtcp2 callbacks

int Connection::on_handshake_completed(ngtcp2_conn*, void* self_) {
  auto* self = static_cast<Connection*>(self_);
  self->established_ = true;
  boost::asio::post(self->io_, [weak = self->weak_from_this()] {
    if (auto s = weak.lock(); s && !s->closed_ && s->hooks_.on_established)
      s->hooks_.on_established(*s);
  });
  return 0;
}

int Connection::on_recv_stream_data(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t,
                                    const uint8_t* data, size_t len, void* self_, void*) {
  auto* self = static_cast<Connection*>(self_);
  auto it = self->streams_.find(id);
  StreamHandler* h = it == self->streams_.end() ? nullptr : it->second.handler;
  if (!h) {
    // Nobody reads it: keep the window open so the connection is not stalled.
    ngtcp2_conn_extend_max_stream_offset(self->conn_, id, len);
    ngtcp2_conn_extend_max_offset(self->conn_, len);
    return 0;
  }
  if (len) h->on_data(data, len);
  if (flags & NGTCP2_STREAM_DATA_FLAG_FIN) {
    it = self->streams_.find(id);
    if (it != self->streams_.end() && it->second.handler) it->second.handler->on_fin();
  }
  return 0;
}

int Connection::on_acked(ngtcp2_conn*, int64_t id, uint64_t offset, uint64_t len, void* self_,
                         void*) {
  auto* self = static_cast<Connection*>(self_);
  auto it = self->streams_.find(id);
  if (it == self->streams_.end()) return 0;
  auto& s = it->second;
  const bool was_full = self->room(id) == 0;
  s.acked = std::max(s.acked, offset + len);
  while (!s.sendq.empty() && s.base + s.sendq.front().size() <= s.acked) {
    s.base += s.sendq.front().size();
    s.sendq.pop_front();
  }
  if (was_full && s.handler && self->room(id) > 0) s.handler->on_writable();
  return 0;
}

int Connection::on_stream_open(ngtcp2_conn* conn, int64_t id, void* self_) {
  auto* self = static_cast<Connection*>(self_);
  StreamHandler* h = self->hooks_.on_stream ? self->hooks_.on_stream(*self, id) : nullptr;
  if (!h) {
    ngtcp2_conn_shutdown_stream(conn, id, 0x101);
    return 0;
  }
  self->streams_[id].handler = h;
  return 0;
}

int Connection::on_stream_close(ngtcp2_conn*, uint32_t, int64_t id, uint64_t code, void* self_,
                                void*) {
  auto* self = static_cast<Connection*>(self_);
  auto it = self->streams_.find(id);
  if (it == self->streams_.end()) return 0;
  StreamHandler* h = it->second.handler;
  self->streams_.erase(it);
  if (h) h->on_closed(code ? "stream reset by the peer (code " + std::to_string(code) + ")" : "");
  return 0;
}

int Connection::on_stream_reset(ngtcp2_conn*, int64_t id, uint64_t, uint64_t code, void* self_,
                                void*) {
  auto* self = static_cast<Connection*>(self_);
  auto it = self->streams_.find(id);
  if (it == self->streams_.end() || !it->second.handler) return 0;
  StreamHandler* h = std::exchange(it->second.handler, nullptr);
  ngtcp2_conn_shutdown_stream(self->conn_, id, code);
  h->on_closed("stream reset by the peer (code " + std::to_string(code) + ")");
  return 0;
}

int Connection::on_extend_max_stream_data(ngtcp2_conn*, int64_t id, uint64_t, void* self_, void*) {
  auto* self = static_cast<Connection*>(self_);
  auto it = self->streams_.find(id);
  if (it == self->streams_.end()) return 0;
  it->second.blocked = false;
  self->mark_ready(id);
  return 0;
}

int Connection::on_new_cid(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token, size_t len, void* self_) {
  auto* self = static_cast<Connection*>(self_);
  cid->datalen = len;
  random_bytes(cid->data, len);
  if (self->settings_.reset_secret) {
    const auto t = stateless_reset_token(*self->settings_.reset_secret, cid->data, cid->datalen);
    std::memcpy(token, t.data(), t.size());
  } else {
    random_bytes(token, NGTCP2_STATELESS_RESET_TOKENLEN);
  }
  if (self->hooks_.on_cid) self->hooks_.on_cid(*self, cid_key(*cid), true);
  return 0;
}

int Connection::on_stateless_reset(ngtcp2_conn*, const ngtcp2_pkt_stateless_reset*, void* self_) {
  static_cast<Connection*>(self_)->close_reason_ =
      "stateless reset: the peer no longer knows this connection (it restarted)";
  return 0;
}

int Connection::on_remove_cid(ngtcp2_conn*, const ngtcp2_cid* cid, void* self_) {
  auto* self = static_cast<Connection*>(self_);
  if (self->hooks_.on_cid) self->hooks_.on_cid(*self, cid_key(*cid), false);
  return 0;
}

std::array<uint8_t, 16> stateless_reset_token(const std::array<uint8_t, 32>& secret,
                                              const uint8_t* cid, size_t cid_len) {
  uint8_t mac[EVP_MAX_MD_SIZE];
  unsigned mac_len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), cid, cid_len, mac, &mac_len);
  std::array<uint8_t, 16> token{};
  std::memcpy(token.data(), mac, token.size());
  return token;
}

std::vector<uint8_t> stateless_reset_packet(const std::array<uint8_t, 32>& secret,
                                            const std::string& dcid, size_t received_len) {
  // RFC 9000 10.3: at least 21 bytes, and shorter than what triggered it.
  constexpr size_t kMin = NGTCP2_MIN_STATELESS_RESET_RANDLEN + NGTCP2_STATELESS_RESET_TOKENLEN + 1;
  if (received_len <= kMin + 1) return {};
  const size_t len = std::min<size_t>(received_len - 1, 64);
  const auto token =
      stateless_reset_token(secret, reinterpret_cast<const uint8_t*>(dcid.data()), dcid.size());
  std::vector<uint8_t> random(len - NGTCP2_STATELESS_RESET_TOKENLEN - 1);
  random_bytes(random.data(), random.size());
  std::vector<uint8_t> out(len);
  const auto n = ngtcp2_pkt_write_stateless_reset(out.data(), out.size(), token.data(),
                                                  random.data(), random.size());
  if (n < 0) return {};
  out.resize(static_cast<size_t>(n));
  return out;
}

std::optional<PacketHeader> peek_header(const uint8_t* data, size_t len) {
  ngtcp2_version_cid vc;
  const int rv = ngtcp2_pkt_decode_version_cid(&vc, data, len, kCidLength);
  if (rv != 0) return std::nullopt;
  PacketHeader h;
  h.dcid.assign(reinterpret_cast<const char*>(vc.dcid), vc.dcidlen);
  h.long_header = (data[0] & 0x80) != 0;
  return h;
}

}  // namespace weft::quic
