// Header lists handed to nghttp2 (which copies them on submit).
#pragma once

#include <nghttp2/nghttp2.h>

#include <vector>

#include "proxy/http/h2_upstream.h"

namespace weft {

// Values new on every request (trace and request IDs) go as never-indexed literals: indexing
// them only churns the HPACK table (the deflater's table search topped a profile).
inline std::vector<nghttp2_nv> to_nva(const H2Fields& fields) {
  std::vector<nghttp2_nv> nva;
  nva.reserve(fields.size());
  for (const auto& [name, value] : fields) {
    const bool unique = name == "traceparent" || name == "x-request-id";
    nva.push_back({const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(name.data())),
                   const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(value.data())),
                   name.size(), value.size(),
                   static_cast<uint8_t>(unique ? NGHTTP2_NV_FLAG_NO_INDEX : NGHTTP2_NV_FLAG_NONE)});
  }
  return nva;
}

}  // namespace weft
