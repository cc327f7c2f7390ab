// Names that travel in SPIFFE IDs, registry keys and URLs (namespaces, service accounts,
// clusters, services): 1-63 of a-z, 0-9, '-', '.', '_'. One rule, checked everywhere.
#pragma once

#include <string_view>

namespace weft {

inline bool is_valid_label(std::string_view s) {
  return !s.empty() && s.size() <= 63 &&
         s.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-._") == std::string_view::npos;
}

}  // namespace weft
