// ASCII helpers for protocol text (header names, config keywords), where locale must not apply.
#pragma once

#include <string>
#include <string_view>

namespace weft {

inline std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

}  // namespace weft
