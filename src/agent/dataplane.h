// The agent's data plane is a `weft proxy` child process, as Envoy is pilot-agent's: the agent
// renders its config from the mesh view and the node certificate, and the proxy does what it
// already does well (HBONE in and out, live listener changes on SIGHUP, certificate files
// watched and rotated). A crash of the proxy is noticed and it is started again.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

namespace weft {

class DataPlane {
 public:
  DataPlane(boost::asio::io_context& io, std::filesystem::path state_dir);
  ~DataPlane();

  // Writes the config; starts the proxy, or tells it to reload (SIGHUP) if it changed.
  void apply(const std::string& config);
  // Stops the proxy (SIGTERM: it drains), waiting for it.
  void stop();
  // The bound HBONE inbound port, from the proxy's admin API; blocking, call off the io thread.
  std::optional<uint16_t> inbound_port() const;

 private:
  void spawn();
  void supervise();

  boost::asio::io_context& io_;
  std::filesystem::path dir_;
  std::string config_;
  pid_t pid_ = -1;
  std::chrono::steady_clock::time_point started_;
  std::chrono::milliseconds restart_delay_{500};
  bool stopping_ = false;
  bool restart_pending_ = false;
  boost::asio::steady_timer timer_;
};

}  // namespace weft
