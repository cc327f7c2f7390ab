#include "identity/spiffe_id.h"

#include <vector>

namespace weft {

namespace {

bool trust_domain_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

bool segment_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_';
}

std::string expected_form(std::string_view text, std::string_view why) {
  return "invalid SPIFFE ID '" + std::string(text) + "': " + std::string(why) + "; expected " +
         std::string(kSpiffeIdForm);
}

}  // namespace

Result<std::string> parse_trust_domain(std::string_view td) {
  if (td.empty()) return make_error("trust domain is empty; expected a name like cluster.local");
  if (td.size() > 255) return make_error("trust domain is longer than 255 characters");
  for (char c : td) {
    if (!trust_domain_char(c))
      return make_error("trust domain '" + std::string(td) +
                        "' may only hold lowercase letters, digits, '.', '-' and '_'");
  }
  return std::string(td);
}

Result<std::string> spiffe_trust_domain(std::string_view uri) {
  constexpr std::string_view scheme = "spiffe://";
  if (uri.substr(0, scheme.size()) != scheme) return make_error("not a spiffe:// URI");
  auto rest = uri.substr(scheme.size());
  auto td = parse_trust_domain(rest.substr(0, rest.find('/')));
  if (!td) return td;
  return td;
}

Result<bool> check_mesh_identity(std::string_view text) {
  constexpr std::string_view node_form = "spiffe://<trust-domain>/cluster/<cluster>/node/<id>";
  const auto node = text.find("/cluster/");
  if (node == std::string_view::npos || text.substr(0, 9) != "spiffe://") {
    auto w = parse_spiffe_id(text);
    if (!w) return make_error(w.error() + ", or a node ID " + std::string(node_form));
    return true;
  }
  auto td = spiffe_trust_domain(text);
  if (!td) return make_error("invalid SPIFFE ID '" + std::string(text) + "': " + td.error());
  const std::string_view path = text.substr(node + 9);
  const auto slash = path.find("/node/");
  const std::string_view cluster = path.substr(0, slash);
  const std::string_view id = slash == std::string_view::npos ? "" : path.substr(slash + 6);
  const auto plain = [](std::string_view s) {
    if (s.empty()) return false;
    for (char c : s)
      if (!segment_char(c)) return false;
    return true;
  };
  if (node != 9 + td->size() || !plain(cluster) || !plain(id))
    return make_error("invalid node ID '" + std::string(text) + "'; expected " +
                      std::string(node_form));
  return true;
}

Result<bool> check_identity_pattern(std::string_view text) {
  if (text == "*") return true;
  if (text.size() > 2 && text.substr(text.size() - 2) == "/*") {
    auto td = spiffe_trust_domain(text);
    if (!td) return make_error("invalid pattern '" + std::string(text) + "': " + td.error());
    return true;
  }
  return check_mesh_identity(text);
}

bool spiffe_pattern_matches(std::string_view pattern, std::string_view id) {
  if (pattern == "*") return true;
  if (pattern.size() >= 2 && pattern.substr(pattern.size() - 2) == "/*")
    return id.substr(0, pattern.size() - 1) == pattern.substr(0, pattern.size() - 1);
  return pattern == id;
}

Result<SpiffeId> parse_spiffe_id(std::string_view text) {
  constexpr std::string_view scheme = "spiffe://";
  if (text.size() > 2048)
    return make_error(expected_form(text.substr(0, 64), "longer than 2048 bytes"));
  if (text.substr(0, scheme.size()) != scheme)
    return make_error(expected_form(text, "must start with spiffe://"));
  std::string_view rest = text.substr(scheme.size());
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    const size_t slash = rest.find('/', start);
    parts.push_back(
        rest.substr(start, slash == std::string_view::npos ? rest.npos : slash - start));
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  auto td = parse_trust_domain(parts[0]);
  if (!td) return make_error(expected_form(text, td.error()));
  if (parts.size() != 5)
    return make_error(expected_form(text, parts.size() > 5 && parts.back().empty()
                                              ? "trailing slash"
                                              : "wrong number of path segments"));
  if (parts[1] != "ns") return make_error(expected_form(text, "second segment must be 'ns'"));
  if (parts[3] != "sa") return make_error(expected_form(text, "fourth segment must be 'sa'"));
  for (size_t i : {2u, 4u}) {
    if (parts[i].empty())
      return make_error(expected_form(text, "empty namespace or service account"));
    for (char c : parts[i]) {
      if (!segment_char(c))
        return make_error(
            expected_form(text, "path segments may only hold letters, digits, '.', '-' and '_'"));
    }
  }
  return SpiffeId{*td, std::string(parts[2]), std::string(parts[4])};
}

}  // namespace weft
