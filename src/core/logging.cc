#include "core/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace weft {

void init_logging(bool verbose) {
  auto logger = spdlog::stderr_color_mt("weft");
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %^%l%$ [%t] %v", spdlog::pattern_time_type::utc);
  logger->set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace weft
