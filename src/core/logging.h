// Process-wide logging: human logs on stderr (spdlog), access logs as JSON lines to their own sink.
#pragma once

#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace weft {

void init_logging(bool verbose);

}  // namespace weft
