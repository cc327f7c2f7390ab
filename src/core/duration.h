// Human durations as operators write them in config and flags: "250ms", "10s", "5m", "24h".
#pragma once

#include <chrono>
#include <string_view>

#include "core/result.h"

namespace weft {

using Millis = std::chrono::milliseconds;

// Parses "<digits><unit>" with unit one of ms, s, m, h, d. Rejects everything else.
Result<Millis> parse_duration(std::string_view text);

std::string format_duration(Millis d);

}  // namespace weft
