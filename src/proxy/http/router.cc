#include "proxy/http/router.h"

#include <string>

#include <re2/re2.h>

namespace weft {

namespace {

bool host_matches(const std::string& pattern, std::string_view host) {
  if (pattern.empty()) return true;
  if (pattern.rfind("*.", 0) == 0) {
    const std::string_view suffix = std::string_view(pattern).substr(1);  // ".example.com"
    return host.size() > suffix.size() && host.substr(host.size() - suffix.size()) == suffix;
  }
  return host == pattern;
}

bool path_matches(const PathMatch& m, std::string_view path) {
  switch (m.kind) {
    case PathMatch::Kind::any:
      return true;
    case PathMatch::Kind::exact:
      return path == m.value;
    case PathMatch::Kind::prefix:
      return path.substr(0, m.value.size()) == m.value;
    case PathMatch::Kind::regex:
      // RE2: linear in the path's length, no recursion, so any path may be tried.
      return RE2::FullMatch(re2::StringPiece(path.data(), path.size()), *m.regex);
  }
  return false;
}

}  // namespace

const RouteConfig* match_route(const std::vector<RouteConfig>& routes, const RequestView& req) {
  for (const auto& r : routes) {
    const auto& m = r.match;
    if (!host_matches(m.host, req.host)) continue;
    if (!m.method.empty() && m.method != req.method) continue;
    if (!path_matches(m.path, req.path)) continue;
    bool headers_ok = true;
    for (const auto& h : m.headers) {
      std::string_view v;
      const bool present = req.header && req.header(req.ctx, h.name, v);
      if (!present || (!h.value.empty() && v != h.value)) {
        headers_ok = false;
        break;
      }
    }
    if (headers_ok) return &r;
  }
  return nullptr;
}

const WeightedBackend& pick_backend(const RouteConfig& route, uint64_t random) {
  if (route.backends.size() == 1) return route.backends.front();
  uint64_t total = 0;
  for (const auto& b : route.backends) total += b.weight;
  uint64_t x = random % total;
  for (const auto& b : route.backends) {
    if (x < b.weight) return b;
    x -= b.weight;
  }
  return route.backends.back();
}

std::string normalize_host(std::string_view h) {
  std::string out;
  if (!h.empty() && h.front() == '[') {
    const auto close = h.find(']');
    out = std::string(h.substr(0, close == std::string_view::npos ? h.size() : close + 1));
  } else {
    out = std::string(h.substr(0, h.find(':')));
  }
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace weft
