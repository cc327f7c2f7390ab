// A strict YAML reader for config files: every value is fetched through it, so every error
// says "file:line:column: field 'a.b[2].c': what is wrong; what to write".
#pragma once

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "config/proxy_config.h"
#include "core/duration.h"
#include "core/host_port.h"
#include "identity/spiffe_id.h"

namespace weft {

// Walks the YAML tree remembering where each node came from, so every error can say
// "file:line:column: field 'a.b[2].c': what is wrong; what to write".
class Reader {
 public:
  Reader(std::string source, std::filesystem::path base)
      : source_(std::move(source)), base_(std::move(base)) {}

  [[noreturn]] void fail(const YAML::Node& node, const std::string& field,
                         const std::string& what) const {
    std::ostringstream out;
    out << source_;
    if (node.IsDefined() && node.Mark().line >= 0)
      out << ":" << node.Mark().line + 1 << ":" << node.Mark().column + 1;
    out << ": field '" << field << "': " << what;
    throw ConfigError(out.str());
  }

  void require_map(const YAML::Node& node, const std::string& field,
                   std::initializer_list<std::string_view> allowed) const {
    if (!node.IsMap()) fail(node, field, "expected a mapping (key: value lines)");
    for (const auto& kv : node) {
      if (!kv.first.IsScalar()) fail(kv.first, field, "keys must be plain names");
      const std::string key = kv.first.Scalar();
      bool known = false;
      for (auto a : allowed) known = known || a == key;
      if (!known) {
        std::string list;
        for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
        fail(kv.first, join(field, key), "unknown field; expected one of: " + list);
      }
    }
  }

  static std::string join(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }

  std::string scalar(const YAML::Node& node, const std::string& field) const {
    if (!node.IsScalar()) fail(node, field, "expected a single value");
    return node.Scalar();
  }

  std::string string_field(const YAML::Node& map, const std::string& parent, const char* key,
                           bool required, std::string fallback = {}) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) {
      if (required) fail(map, join(parent, key), "is required");
      return fallback;
    }
    return scalar(n, join(parent, key));
  }

  HostPort address(const YAML::Node& map, const std::string& parent, const char* key, bool required,
                   HostPort fallback = {}, bool allow_zero = false) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) {
      if (required) fail(map, join(parent, key), "is required (host:port)");
      return fallback;
    }
    auto hp = parse_host_port(scalar(n, join(parent, key)), allow_zero);
    if (!hp) fail(n, join(parent, key), hp.error());
    return *hp;
  }

  Millis duration(const YAML::Node& map, const std::string& parent, const char* key,
                  Millis fallback) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    auto d = parse_duration(scalar(n, join(parent, key)));
    if (!d) fail(n, join(parent, key), d.error());
    return *d;
  }

  unsigned number(const YAML::Node& map, const std::string& parent, const char* key,
                  unsigned fallback, unsigned lo, unsigned hi) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    const std::string s = scalar(n, join(parent, key));
    unsigned long v = 0;
    size_t used = 0;
    try {
      v = std::stoul(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != s.size() || s.empty() || s[0] == '-' || v < lo || v > hi)
      fail(n, join(parent, key),
           "expected a whole number from " + std::to_string(lo) + " to " + std::to_string(hi));
    return static_cast<unsigned>(v);
  }

  // Exact identities (what a server must present) or, with `patterns`, authorization patterns.
  std::vector<std::string> spiffe_list(const YAML::Node& map, const std::string& parent,
                                       const char* key, bool patterns = false) const {
    std::vector<std::string> out;
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return out;
    if (!n.IsSequence()) fail(n, join(parent, key), "expected a list of SPIFFE IDs");
    for (size_t i = 0; i < n.size(); ++i) {
      const std::string field = join(parent, key) + "[" + std::to_string(i) + "]";
      const std::string id = scalar(n[i], field);
      auto parsed = patterns ? check_identity_pattern(id) : check_mesh_identity(id);
      if (!parsed) fail(n[i], field, parsed.error());
      out.push_back(id);
    }
    return out;
  }

  double decimal(const YAML::Node& map, const std::string& parent, const char* key, double fallback,
                 double lo, double hi) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    const std::string s = scalar(n, join(parent, key));
    double v = 0;
    size_t used = 0;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != s.size() || s.empty() || !(v >= lo && v <= hi))
      fail(n, join(parent, key),
           "expected a number from " + trim_number(lo) + " to " + trim_number(hi));
    return v;
  }

  bool boolean(const YAML::Node& map, const std::string& parent, const char* key,
               bool fallback) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return fallback;
    const std::string v = scalar(n, join(parent, key));
    if (v != "true" && v != "false") fail(n, join(parent, key), "expected true or false");
    return v == "true";
  }

  // A list under `parent.key`; absent means empty.
  const YAML::Node sequence(const YAML::Node& map, const std::string& parent,
                            const char* key) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return YAML::Node(YAML::NodeType::Sequence);
    if (!n.IsSequence()) fail(n, join(parent, key), "expected a list (lines starting with '- ')");
    return n;
  }

  static std::string trim_number(double v) {
    std::ostringstream out;
    out << v;
    return out.str();
  }

  const YAML::Node sequence(const YAML::Node& map, const char* key) const {
    const YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return YAML::Node(YAML::NodeType::Sequence);
    if (!n.IsSequence()) fail(n, key, "expected a list (lines starting with '- ')");
    return n;
  }

  std::filesystem::path path(const YAML::Node& map, const std::string& parent,
                             const char* key) const {
    std::filesystem::path p = string_field(map, parent, key, true);
    return p.is_absolute() ? p : base_ / p;
  }

 private:
  std::string source_;
  std::filesystem::path base_;
};

}  // namespace weft
