#include "proxy/capture/explicit_proxy.h"

#include <algorithm>
#include <cctype>

#include <boost/asio/ip/address.hpp>

#include "core/ascii.h"

namespace weft::socks5 {

Result<std::optional<Greeting>> parse_greeting(const uint8_t* data, size_t len) {
  if (len < 2) return std::optional<Greeting>{};
  if (data[0] != 0x05)
    return make_error("not SOCKS version 5 (first byte " + std::to_string(data[0]) + ")");
  const size_t n = data[1];
  if (n == 0) return make_error("SOCKS5 greeting offers no authentication method");
  if (len < 2 + n) return std::optional<Greeting>{};
  return std::optional<Greeting>{Greeting{{data + 2, data + 2 + n}, 2 + n}};
}

Result<std::optional<Credentials>> parse_credentials(const uint8_t* data, size_t len) {
  // RFC 1929: VER(1)=1 ULEN(1) UNAME PLEN(1) PASSWD
  if (len < 2) return std::optional<Credentials>{};
  if (data[0] != 0x01)
    return make_error("SOCKS5 username/password version must be 1, got " + std::to_string(data[0]));
  const size_t ulen = data[1];
  if (ulen == 0) return make_error("SOCKS5 username is empty");
  if (len < 2 + ulen + 1) return std::optional<Credentials>{};
  const size_t plen = data[2 + ulen];
  if (len < 3 + ulen + plen) return std::optional<Credentials>{};
  Credentials c;
  c.user.assign(reinterpret_cast<const char*>(data + 2), ulen);
  c.password.assign(reinterpret_cast<const char*>(data + 3 + ulen), plen);
  c.consumed = 3 + ulen + plen;
  return std::optional<Credentials>{std::move(c)};
}

Result<std::optional<Request>> parse_request(const uint8_t* data, size_t len) {
  // VER CMD RSV ATYP DST.ADDR DST.PORT
  if (len < 5) return std::optional<Request>{};
  if (data[0] != 0x05) return make_error("SOCKS5 request has version " + std::to_string(data[0]));
  if (data[2] != 0x00) return make_error("SOCKS5 request reserved byte must be 0");
  Request r;
  r.command = data[1];
  size_t addr_len = 0, off = 4;
  switch (data[3]) {
    case 0x01:
      addr_len = 4;
      break;
    case 0x04:
      addr_len = 16;
      break;
    case 0x03:
      addr_len = data[4];
      off = 5;
      if (addr_len == 0) return make_error("SOCKS5 request names an empty host");
      break;
    default:
      return make_error("SOCKS5 address type " + std::to_string(data[3]) + " is not 1, 3 or 4");
  }
  if (len < off + addr_len + 2) return std::optional<Request>{};
  const uint8_t* a = data + off;
  if (data[3] == 0x01) {
    boost::asio::ip::address_v4::bytes_type b;
    std::copy(a, a + 4, b.begin());
    r.target.host = boost::asio::ip::address_v4(b).to_string();
  } else if (data[3] == 0x04) {
    boost::asio::ip::address_v6::bytes_type b;
    std::copy(a, a + 16, b.begin());
    r.target.host = boost::asio::ip::address_v6(b).to_string();
  } else {
    r.by_name = true;
    r.target.host.assign(reinterpret_cast<const char*>(a), addr_len);
    for (auto& ch : r.target.host)
      ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    // Through parse_host_port's rules, so a hostile name cannot smuggle anything.
    if (auto ok = parse_host_port(r.target.host + ":1"); !ok)
      return make_error("SOCKS5 request names an invalid host: " + ok.error());
  }
  r.target.port = static_cast<uint16_t>((a[addr_len] << 8) | a[addr_len + 1]);
  if (r.target.port == 0) return make_error("SOCKS5 request asks for port 0");
  r.consumed = off + addr_len + 2;
  return std::optional<Request>{std::move(r)};
}

std::array<uint8_t, 10> reply(Reply code) { return {0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0}; }

}  // namespace weft::socks5

namespace weft::http_proxy {

namespace {
constexpr size_t kMaxHead = 16 * 1024;
}  // namespace

Result<std::optional<Request>> parse_request(std::string_view data) {
  const size_t end = data.find("\r\n\r\n");
  if (end == std::string_view::npos) {
    if (data.size() > kMaxHead) return make_error("431 request head larger than 16 KiB");
    // Fail early on what cannot become a request line, rather than wait for the deadline.
    for (char c : data.substr(0, std::min<size_t>(data.size(), 16))) {
      if (c == ' ') break;
      if (!std::isupper(static_cast<unsigned char>(c)))
        return make_error("400 not an HTTP proxy request (nor SOCKS5)");
    }
    return std::optional<Request>{};
  }
  Request r;
  r.head_len = end + 4;
  const size_t eol = data.find("\r\n");
  const std::string_view line = data.substr(0, eol);
  const size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1) return make_error("400 malformed request line");
  r.method.assign(line.substr(0, sp1));
  const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.1" && version != "HTTP/1.0")
    return make_error("400 unsupported HTTP version '" + std::string(version) + "'");
  if (r.method == "CONNECT") {
    r.connect = true;
    auto hp = parse_host_port(target);
    if (!hp || hp->port == 0)
      return make_error("400 CONNECT needs host:port, got '" + std::string(target) + "'");
    r.target = *hp;
  } else {
    // Absolute form only: an origin-form request ("GET / HTTP/1.1") was meant for a server.
    const std::string t = ascii_lower(target);
    if (t.rfind("http://", 0) != 0)
      return make_error(
          "400 a proxy request needs an absolute http:// URI (use CONNECT for https)");
    std::string_view rest = target.substr(7);
    const size_t slash = rest.find_first_of("/?#");
    std::string authority(rest.substr(0, slash));
    std::string path(slash == std::string_view::npos ? "/" : rest.substr(slash));
    if (path.front() != '/') path.insert(0, "/");
    if (const size_t hash = path.find('#'); hash != std::string::npos) path.resize(hash);
    r.origin_head = r.method + " " + path + " " + std::string(version) + "\r\n";
    if (authority.find('@') != std::string::npos)
      return make_error("400 user information in the URI is not accepted");
    const bool bracketed = !authority.empty() && authority.front() == '[';
    const size_t colon = authority.rfind(':');
    const bool has_port = colon != std::string::npos && (!bracketed || colon > authority.find(']'));
    auto hp = parse_host_port(has_port ? authority : authority + ":80");
    if (!hp || hp->port == 0)
      return make_error("400 bad host in '" + std::string(target) +
                        "': " + (hp ? std::string("port 0") : hp.error()));
    r.target = *hp;
  }
  for (char& c : r.target.host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  size_t pos = eol + 2;
  while (pos < end) {
    size_t next = data.find("\r\n", pos);
    if (next == std::string_view::npos || next > end) next = end;
    const std::string_view h = data.substr(pos, next - pos);
    pos = next + 2;
    const size_t colon = h.find(':');
    if (colon == std::string_view::npos) return make_error("400 malformed header line");
    const std::string name = ascii_lower(h.substr(0, colon));
    if (name.rfind("proxy-", 0) != 0) {
      if (!r.connect) r.origin_head.append(h).append("\r\n");
      continue;
    }
    if (name != "proxy-authorization") continue;
    std::string_view v = h.substr(colon + 1);
    while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
    r.proxy_authorization.assign(v);
  }
  if (!r.connect) r.origin_head += "\r\n";
  return std::optional<Request>{std::move(r)};
}

}  // namespace weft::http_proxy
