// The worker's capture handlers: transparent (iptables REDIRECT) and explicit (SOCKS5, HTTP
// proxy) connections, detected and routed to a mesh service or out of the mesh. Bytes are
// peeked, never read ahead: what the handshake did not use stays in the socket for the tunnel.
#include <openssl/evp.h>
#include <spdlog/spdlog.h>

#include <boost/asio/write.hpp>

#include "proxy/capture/capture.h"
#include "proxy/capture/explicit_proxy.h"
#include "proxy/capture/sniff.h"
#include "proxy/worker.h"

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

bool is_ip_literal(const std::string& host) {
  boost::system::error_code ec;
  asio::ip::make_address(host, ec);
  return !ec;
}

// Small answers go out with a blocking write: a few bytes into an empty send buffer.
bool write_now(tcp::socket& s, std::string_view data) {
  boost::system::error_code ec;
  asio::write(s, asio::buffer(data.data(), data.size()), ec);
  return !ec;
}

void answer_and_close(tcp::socket& s, std::string_view data) {
  write_now(s, data);
  boost::system::error_code ignored;
  s.shutdown(tcp::socket::shutdown_send, ignored);
  s.close(ignored);
}

std::string socks_reply(socks5::Reply code) {
  const auto r = socks5::reply(code);
  return std::string(r.begin(), r.end());
}

std::string http_answer(int status, const std::string& message) {
  const char* reason = status == 403   ? "Forbidden"
                       : status == 407 ? "Proxy Authentication Required"
                       : status == 431 ? "Request Header Fields Too Large"
                       : status == 502 ? "Bad Gateway"
                                       : "Bad Request";
  const std::string body = message + "\n";
  return "HTTP/1.1 " + std::to_string(status) + " " + reason +
         "\r\nContent-Type: text/plain\r\nConnection: close\r\n" +
         (status == 407 ? "Proxy-Authenticate: Basic realm=\"weft\"\r\n" : "") +
         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

std::string base64(const std::string& in) {
  std::string out(4 * ((in.size() + 2) / 3), '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(in.data()),
                                static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

const uint8_t* bytes_of(std::string_view b) { return reinterpret_cast<const uint8_t*>(b.data()); }

}  // namespace

void Worker::handle_transparent(tcp::socket socket) {
  auto snap = snapshot_;
  AccessLogEntry entry;
  entry.direction = "outbound";
  entry.listener = "capture/transparent";
  entry.downstream = remote_of(socket);
  auto dst = redirected_destination(socket);
  if (!dst) {
    entry.result = "no_original_destination: " + dst.error();
    access_log_.write(entry);
    return;
  }
  const HostPort destination = *dst;
  entry.destination = destination.to_string();
  const auto& cap = snap->config->capture;
  // Detection only helps when a name could match on this port; otherwise (and on opaque
  // ports) the connection goes by address at once, so a server-first protocol never waits.
  bool name_possible = false;
  for (const auto& s : snap->config->services)
    for (const auto& d : s.destinations)
      name_possible = name_possible || (d.port == destination.port && !is_ip_literal(d.host));
  const bool opaque = std::find(cap.opaque_ports.begin(), cap.opaque_ports.end(),
                                destination.port) != cap.opaque_ports.end();
  if (opaque || !name_possible) {
    entry.protocol = opaque ? "tcp (opaque port)" : "tcp";
    return forward_captured(snap, std::move(socket), "", destination, std::move(entry), nullptr);
  }
  auto held = std::make_shared<tcp::socket>(std::move(socket));
  peek_until(
      *held, cap.detect_timeout, sniff::kMaxPeek,
      [this, held, snap, destination, entry = std::move(entry)](std::string_view bytes,
                                                                bool final) mutable {
        const auto d = sniff::detect(bytes_of(bytes), bytes.size());
        if (d.protocol == sniff::Protocol::need_more && !final) return false;
        std::string name;
        if (d.protocol == sniff::Protocol::tls) name = d.sni;
        if (d.protocol == sniff::Protocol::http1)
          if (auto hp = split_host_header(d.host, destination.port); hp && !is_ip_literal(hp->host))
            name = hp->host;
        entry.protocol =
            bytes.empty() ? "tcp (client silent: server first?)" : sniff::protocol_name(d.protocol);
        forward_captured(snap, std::move(*held), name, destination, std::move(entry), nullptr);
        return true;
      });
}

void Worker::handle_inbound_capture(tcp::socket socket) {
  AccessLogEntry entry;
  entry.direction = "inbound";
  entry.listener = "capture/inbound";
  entry.downstream = remote_of(socket);
  entry.protocol = "tcp (plaintext)";
  auto dst = redirected_destination(socket);
  if (!dst) {
    entry.result = "no_original_destination: " + dst.error();
    access_log_.write(entry);
    return;
  }
  const HostPort destination = *dst;
  entry.destination = destination.to_string();
  if (!snapshot_->config->capture.inbound_plaintext_allowed) {
    entry.result =
        "plaintext_denied: mesh traffic arrives over HBONE; capture.inbound_plaintext is deny";
    access_log_.write(entry);
    return;
  }
  // To the app at the address it was meant for; the proxy's own uid is never captured.
  open_egress(destination, std::move(socket), std::move(entry), nullptr);
}

void Worker::handle_explicit(tcp::socket socket) {
  AccessLogEntry entry;
  entry.direction = "outbound";
  entry.listener = "capture/explicit";
  entry.downstream = remote_of(socket);
  auto held = std::make_shared<tcp::socket>(std::move(socket));
  peek_until(*held, snapshot_->config->capture.handshake_timeout, 1,
             [this, held, entry = std::move(entry)](std::string_view bytes, bool) mutable {
               if (bytes.empty()) return true;  // gone, or silent past the deadline
               if (bytes[0] == 0x05)
                 explicit_socks5(held, std::move(entry));
               else
                 explicit_http(held, std::move(entry));
               return true;
             });
}

void Worker::explicit_socks5(std::shared_ptr<tcp::socket> s, AccessLogEntry entry) {
  entry.protocol = "socks5";
  auto snap = snapshot_;
  const auto timeout = snap->config->capture.handshake_timeout;
  // Logs why the handshake ended and answers with `answer` (if any) before closing.
  auto fail = [this, s](AccessLogEntry& e, const std::string& why, std::string_view answer) {
    e.result = why;
    access_log_.write(e);
    answer_and_close(*s, answer);
  };
  // After the method (and credentials): the CONNECT request.
  auto request = [this, s, snap, timeout, fail](AccessLogEntry e) {
    peek_until(*s, timeout, 262,
               [this, s, snap, fail, e = std::move(e)](std::string_view b, bool final) mutable {
                 auto req = socks5::parse_request(bytes_of(b), b.size());
                 if (!req) {
                   fail(e, "socks5_bad_request: " + req.error(),
                        socks_reply(socks5::general_failure));
                   return true;
                 }
                 if (!*req) {
                   if (final) fail(e, "socks5_handshake_timeout", {});
                   return final;
                 }
                 consume(*s, (*req)->consumed);
                 e.destination = (*req)->target.to_string();
                 if ((*req)->command != 1) {
                   fail(e, "socks5_command_not_supported: only CONNECT is",
                        socks_reply(socks5::command_not_supported));
                   return true;
                 }
                 Ready ready = [](tcp::socket& down, const std::string& failure) {
                   if (failure.empty())
                     return void(write_now(down, socks_reply(socks5::succeeded)));
                   answer_and_close(down, socks_reply(failure.rfind("egress_denied", 0) == 0
                                                          ? socks5::not_allowed
                                                          : socks5::host_unreachable));
                 };
                 forward_captured(snap, std::move(*s), (*req)->by_name ? (*req)->target.host : "",
                                  (*req)->target, std::move(e), std::move(ready));
                 return true;
               });
  };
  auto credentials = [this, s, snap, timeout, fail, request](AccessLogEntry e) {
    peek_until(*s, timeout, 513,
               [s, snap, fail, request, e = std::move(e)](std::string_view b, bool final) mutable {
                 auto c = socks5::parse_credentials(bytes_of(b), b.size());
                 if (!c) {
                   fail(e, "socks5_bad_credentials: " + c.error(), {});
                   return true;
                 }
                 if (!*c) {
                   if (final) fail(e, "socks5_handshake_timeout", {});
                   return final;
                 }
                 consume(*s, (*c)->consumed);
                 bool ok = false;
                 for (const auto& u : snap->config->capture.users)
                   ok = ok || (u.name == (*c)->user && u.password == (*c)->password);
                 if (!ok) {
                   fail(e, "socks5_auth_failed: user '" + (*c)->user + "'",
                        std::string("\x01\x01", 2));
                   return true;
                 }
                 if (write_now(*s, std::string("\x01\x00", 2))) request(std::move(e));
                 return true;
               });
  };
  peek_until(*s, timeout, 257,
             [s, snap, fail, request, credentials, entry = std::move(entry)](std::string_view b,
                                                                             bool final) mutable {
               auto g = socks5::parse_greeting(bytes_of(b), b.size());
               if (!g) {
                 fail(entry, "socks5_bad_greeting: " + g.error(), {});
                 return true;
               }
               if (!*g) {
                 if (final) fail(entry, "socks5_handshake_timeout", {});
                 return final;
               }
               consume(*s, (*g)->consumed);
               const bool auth = !snap->config->capture.users.empty();
               const uint8_t want = auth ? socks5::kUserPass : socks5::kNoAuth;
               const auto& m = (*g)->methods;
               if (std::find(m.begin(), m.end(), want) == m.end()) {
                 fail(entry,
                      auth ? "socks5_auth_required: the client offered no username/password"
                           : "socks5_no_acceptable_method: the client insists on authentication",
                      std::string("\x05\xff", 2));
                 return true;
               }
               if (!write_now(*s, std::string{'\x05', static_cast<char>(want)})) return true;
               if (auth)
                 credentials(std::move(entry));
               else
                 request(std::move(entry));
               return true;
             });
}

void Worker::explicit_http(std::shared_ptr<tcp::socket> s, AccessLogEntry entry) {
  auto snap = snapshot_;
  entry.protocol = "http-proxy";
  peek_until(
      *s, snap->config->capture.handshake_timeout, 16 * 1024 + 1,
      [this, s, snap, entry = std::move(entry)](std::string_view b, bool final) mutable {
        auto req = http_proxy::parse_request(b);
        if (!req) {
          // Errors start with the status to answer with: "400 ...", "431 ...".
          const int status = std::atoi(req.error().substr(0, 3).c_str());
          entry.result = "http_proxy_bad_request: " + req.error().substr(4);
          access_log_.write(entry);
          answer_and_close(*s, http_answer(status, req.error().substr(4)));
          return true;
        }
        if (!*req) {
          if (final) {
            entry.result = "http_proxy_handshake_timeout";
            access_log_.write(entry);
            answer_and_close(*s, {});
          }
          return final;
        }
        const auto& r = **req;
        if (r.connect) entry.protocol = "http-connect";
        entry.destination = r.target.to_string();
        if (const auto& users = snap->config->capture.users; !users.empty()) {
          bool ok = false;
          if (r.proxy_authorization.rfind("Basic ", 0) == 0)
            for (const auto& u : users)
              ok = ok || r.proxy_authorization.substr(6) == base64(u.name + ":" + u.password);
          if (!ok) {
            entry.result = "http_proxy_auth_required";
            access_log_.write(entry);
            answer_and_close(*s, http_answer(407, "proxy credentials required"));
            return true;
          }
        }
        Ready ready = [connect = r.connect](tcp::socket& down, const std::string& failure) {
          if (failure.empty()) {
            if (connect) write_now(down, "HTTP/1.1 200 Connection established\r\n\r\n");
            return;
          }
          answer_and_close(
              down, http_answer(failure.rfind("egress_denied", 0) == 0 ? 403 : 502, failure));
        };
        // CONNECT's head is ours. An absolute-URI request's head goes on rewritten (origin
        // form, no Proxy-* headers); its body and anything after stay in the socket. Later
        // requests on the connection go to the same origin.
        consume(*s, r.head_len);
        forward_captured(snap, std::move(*s), is_ip_literal(r.target.host) ? "" : r.target.host,
                         r.target, std::move(entry), std::move(ready),
                         r.connect ? std::string() : r.origin_head);
        return true;
      });
}

void Worker::forward_captured(SnapshotPtr snap, tcp::socket socket, const std::string& name,
                              const HostPort& destination, AccessLogEntry entry, Ready ready,
                              std::string prefix) {
  const auto route = route_captured(*snap->config, name, destination);
  if (!name.empty()) entry.authority = name;
  if (!route.denied.empty()) {
    entry.result = route.denied;
    access_log_.write(entry);
    if (ready) ready(socket, route.denied);
    return;  // a transparent client sees its connection close
  }
  if (route.service) {
    if (!snap->tls) {
      entry.result = "no_identity: reaching a mesh service needs a certificate";
      access_log_.write(entry);
      if (ready) ready(socket, entry.result);
      return;
    }
    // The tunnel opens lazily and the client may talk at once: the proxy answers now.
    if (ready) ready(socket, "");
    return open_mesh(*route.service, std::move(socket), std::move(entry), std::move(prefix));
  }
  open_egress(*route.egress, std::move(socket), std::move(entry), std::move(ready),
              std::move(prefix));
}

}  // namespace weft
