// Pieces of the Prometheus text exposition format shared by the metric writers.
#pragma once

#include <string>
#include <string_view>

namespace weft {

// A label value with backslash, double quote and newline escaped.
inline std::string prometheus_label(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    if (c == '\\' || c == '"') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace weft
