#include "core/duration.h"

#include <charconv>
#include <string>

namespace weft {

Result<Millis> parse_duration(std::string_view text) {
  const auto bad = [&] {
    return make_error("invalid duration '" + std::string(text) +
                      "': expected a number and a unit, like 250ms, 10s, 5m, 24h or 7d");
  };
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 12) return bad();
  long long n = 0;
  std::from_chars(text.data(), text.data() + digits, n);
  const std::string_view unit = text.substr(digits);
  long long ms_per = 0;
  if (unit == "ms")
    ms_per = 1;
  else if (unit == "s")
    ms_per = 1000;
  else if (unit == "m")
    ms_per = 60'000;
  else if (unit == "h")
    ms_per = 3'600'000;
  else if (unit == "d")
    ms_per = 86'400'000;
  else
    return bad();
  constexpr long long kMaxMillis = 100LL * 365 * 86'400'000;  // a century is plenty
  if (n > kMaxMillis / ms_per)
    return make_error("duration '" + std::string(text) + "' is too long (at most 36500d)");
  return Millis(n * ms_per);
}

std::string format_duration(Millis d) {
  const auto ms = d.count();
  if (ms % 3'600'000 == 0 && ms != 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms % 60'000 == 0 && ms != 0) return std::to_string(ms / 60'000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

}  // namespace weft
