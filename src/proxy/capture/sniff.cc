#include "proxy/capture/sniff.h"

#include <algorithm>
#include <cctype>
#include <cstring>

namespace weft::sniff {

namespace {

constexpr std::string_view kH2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
constexpr size_t kMaxHead = 16 * 1024;

// A bounds-checked reader over a byte range; every read past the end sets `bad`.
struct Cursor {
  const uint8_t* p;
  size_t left;
  bool bad = false;
  uint32_t u(size_t n) {
    if (left < n) {
      bad = true;
      left = 0;
      return 0;
    }
    uint32_t v = 0;
    for (size_t i = 0; i < n; ++i) v = (v << 8) | p[i];
    p += n;
    left -= n;
    return v;
  }
  Cursor sub(size_t n) {
    if (left < n) {
      bad = true;
      Cursor c{p, 0};
      c.bad = true;
      left = 0;
      return c;
    }
    Cursor c{p, n};
    p += n;
    left -= n;
    return c;
  }
};

Detected only(Protocol p) {
  Detected d;
  d.protocol = p;
  return d;
}

bool valid_hostname(std::string_view s) {
  if (s.empty() || s.size() > 253) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

// RFC 8446 4.1.2 / RFC 6066 3. Only the first record: a ClientHello split across records is
// allowed but unheard of below 16 KiB.
Detected detect_tls(const uint8_t* data, size_t len) {
  Detected d;
  if (len < 5) return only(Protocol::need_more);
  const size_t record_len = (size_t(data[3]) << 8) | data[4];
  if (data[1] != 0x03 || record_len == 0 || record_len > 16384) return d;  // opaque
  if (len < 5 + 4) return only(Protocol::need_more);
  if (data[5] != 0x01 || record_len < 4) return d;  // not a ClientHello
  const size_t hs_len = (size_t(data[6]) << 16) | (size_t(data[7]) << 8) | data[8];
  const size_t have = std::min(len - 9, record_len - 4);
  if (hs_len > record_len - 4) {  // spans records: TLS, routed without SNI
    d.protocol = Protocol::tls;
    return d;
  }
  if (have < hs_len) return only(Protocol::need_more);
  d.protocol = Protocol::tls;
  Cursor c{data + 9, hs_len};
  c.u(2);   // legacy_version
  c.u(32);  // random
  c.sub(c.u(1));
  c.sub(c.u(2));
  c.sub(c.u(1));
  if (c.bad || c.left < 2) return d;  // no extensions: TLS, no SNI
  Cursor ext = c.sub(c.u(2));
  while (!ext.bad && ext.left >= 4) {
    const uint32_t type = ext.u(2);
    Cursor body = ext.sub(ext.u(2));
    if (type != 0) continue;  // server_name
    Cursor list = body.sub(body.u(2));
    while (!list.bad && list.left >= 3) {
      const uint32_t name_type = list.u(1);
      Cursor name = list.sub(list.u(2));
      if (name.bad) break;
      std::string_view host(reinterpret_cast<const char*>(name.p), name.left);
      if (name_type == 0 && valid_hostname(host)) {
        d.sni.assign(host);
        for (auto& ch : d.sni) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        return d;
      }
    }
    return d;
  }
  return d;
}

bool is_token_char(char c) {
  return std::isupper(static_cast<unsigned char>(c)) || c == '-' || c == '_';
}

Detected detect_http1(std::string_view s) {
  Detected d;
  // Method: 1-16 upper-case letters then a space ("GET ", "OPTIONS ", "M-SEARCH ").
  size_t i = 0;
  while (i < s.size() && i < 17 && is_token_char(s[i])) ++i;
  if (i == s.size()) return only(i <= 16 ? Protocol::need_more : Protocol::opaque);
  if (i == 0 || i > 16 || s[i] != ' ') return d;
  const size_t line_end = s.find("\r\n");
  if (line_end == std::string_view::npos) {
    if (s.size() > kMaxHead) return d;
    // Still a plausible request line: no control characters so far.
    for (char c : s)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return d;
    return only(Protocol::need_more);
  }
  const std::string_view line = s.substr(0, line_end);
  const size_t sp2 = line.rfind(' ');
  if (sp2 == std::string_view::npos || sp2 <= i + 1) return d;
  const std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.1" && version != "HTTP/1.0") return d;
  const std::string_view target = line.substr(i + 1, sp2 - i - 1);
  if (target.empty() || target.find(' ') != std::string_view::npos) return d;
  const size_t head_end = s.find("\r\n\r\n");
  if (head_end == std::string_view::npos)
    return only(s.size() > kMaxHead ? Protocol::opaque : Protocol::need_more);
  d.protocol = Protocol::http1;
  d.method.assign(s.substr(0, i));
  d.target.assign(target);
  size_t pos = line_end + 2;
  while (pos < head_end) {
    size_t eol = s.find("\r\n", pos);
    if (eol == std::string_view::npos || eol > head_end) eol = head_end;
    const std::string_view h = s.substr(pos, eol - pos);
    pos = eol + 2;
    const size_t colon = h.find(':');
    if (colon != 4) continue;
    std::string name(h.substr(0, 4));
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (name != "host") continue;
    std::string_view v = h.substr(5);
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
    d.host.assign(v);
    for (auto& ch : d.host) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    break;
  }
  return d;
}

}  // namespace

Detected detect(const uint8_t* data, size_t len) {
  if (len == 0) return only(Protocol::need_more);
  if (data[0] == 0x16) return detect_tls(data, len);
  const std::string_view s(reinterpret_cast<const char*>(data), len);
  // The HTTP/2 preface starts like an HTTP/1 request ("PRI * HTTP/2.0"), so it goes first.
  const size_t n = std::min(s.size(), kH2Preface.size());
  if (s.substr(0, n) == kH2Preface.substr(0, n))
    return only(n == kH2Preface.size() ? Protocol::http2 : Protocol::need_more);
  return detect_http1(s);
}

const char* protocol_name(Protocol p) {
  switch (p) {
    case Protocol::need_more:
      return "undetected";
    case Protocol::tls:
      return "tls";
    case Protocol::http1:
      return "http/1.1";
    case Protocol::http2:
      return "h2c";
    case Protocol::opaque:
      return "tcp";
  }
  return "tcp";
}

}  // namespace weft::sniff
