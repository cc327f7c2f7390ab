#include "stats/access_log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <boost/json.hpp>

#include "identity/certificate_info.h"

namespace weft {

AccessLog::AccessLog(const std::string& target) {
  if (target == "off") return;
  if (target == "stdout")
    logger_ = std::make_shared<spdlog::logger>("access",
                                               std::make_shared<spdlog::sinks::stdout_sink_mt>());
  else
    logger_ = std::make_shared<spdlog::logger>(
        "access", std::make_shared<spdlog::sinks::basic_file_sink_mt>(target));
  logger_->set_pattern("%v");
  logger_->flush_on(spdlog::level::info);
}

void AccessLog::write(const AccessLogEntry& e) {
  if (!logger_) return;
  using namespace std::chrono;
  const auto now = system_clock::now();
  const auto start_ms = duration_cast<milliseconds>(e.start.time_since_epoch()).count();
  std::string start = format_utc(static_cast<std::time_t>(start_ms / 1000));
  start.insert(start.size() - 1, "." + fmt::format("{:03}", start_ms % 1000));
  boost::json::object o{
      {"start", start},
      {"duration_us", duration_cast<microseconds>(now - e.start).count()},
      {"direction", e.direction},
      {"listener", e.listener},
      {"downstream", e.downstream},
      {"peer_identity", e.peer_identity},
      {"local_identity", e.local_identity},
      {"upstream", e.upstream},
      {"authority", e.authority},
      {"bytes_received", e.bytes_received},
      {"bytes_sent", e.bytes_sent},
      {"result", e.result},
  };
  // Captured connections: what the client asked for and what detection saw.
  if (!e.destination.empty()) o["destination"] = e.destination;
  if (!e.protocol.empty()) o["protocol"] = e.protocol;
  if (!e.method.empty()) {
    o["method"] = e.method;
    o["path"] = e.path;
    o["host"] = e.host;
    o["route"] = e.route;
    o["status"] = e.status;
    o["response_flags"] = e.response_flags;
    o["attempts"] = e.attempts;
    o["trace_id"] = e.trace_id;
  }
  logger_->info(boost::json::serialize(o));
}

}  // namespace weft
