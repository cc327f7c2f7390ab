#include "agent/dataplane.h"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <fstream>
#include <thread>

#include "core/host_port.h"
#include "http/http_client.h"
#include "identity/certificate_authority.h"

namespace weft {

namespace fs = std::filesystem;

DataPlane::DataPlane(boost::asio::io_context& io, fs::path state_dir)
    : io_(io), dir_(std::move(state_dir)), timer_(io) {}

DataPlane::~DataPlane() { stop(); }

void DataPlane::apply(const std::string& config) {
  if (config == config_ && pid_ > 0) return;
  config_ = config;
  write_file_atomic(dir_ / "dataplane.json", config, 0600);
  if (pid_ > 0) {
    spdlog::info("agent: data plane config changed; reloading the proxy");
    ::kill(pid_, SIGHUP);
  } else if (!restart_pending_) {
    spawn();
    supervise();
  }
}

void DataPlane::spawn() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  const std::string exe_s = ec ? "weft" : exe.string(), cfg = (dir_ / "dataplane.json").string(),
                    admin = (dir_ / "dataplane.admin").string();
  fs::remove(dir_ / "dataplane.admin", ec);
  const char* argv[] = {exe_s.c_str(),          "proxy",       "-c",   cfg.c_str(),
                        "--admin-address-path", admin.c_str(), nullptr};
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ == 0) {
    // The proxy must not outlive its agent.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);
    // Nothing of the agent's may live on in the proxy: an inherited UDP or listening socket
    // would hold the agent's ports after it died (a restarted agent could not bind them).
    ::close_range(3, ~0U, 0);
    ::execv(argv[0], const_cast<char* const*>(argv));
    ::_exit(127);
  }
  started_ = std::chrono::steady_clock::now();
  if (pid_ < 0)
    spdlog::error("agent: cannot start the data plane proxy: {}", strerror(errno));
  else
    spdlog::info("agent: data plane proxy started (pid {})", pid_);
}

void DataPlane::supervise() {
  timer_.expires_after(std::chrono::milliseconds(500));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopping_ || pid_ <= 0) return;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      spdlog::error("agent: the data plane proxy exited ({}); starting it again in {} ms",
                    WIFEXITED(status) ? "code " + std::to_string(WEXITSTATUS(status))
                                      : "signal " + std::to_string(WTERMSIG(status)),
                    restart_delay_.count());
      pid_ = -1;
      restart_pending_ = true;
      timer_.expires_after(restart_delay_);
      restart_delay_ = std::min(restart_delay_ * 2, std::chrono::milliseconds(30000));
      timer_.async_wait([this](const boost::system::error_code& ec) {
        restart_pending_ = false;
        if (ec || stopping_) return;
        spawn();
        supervise();
      });
      return;
    }
    if (std::chrono::steady_clock::now() - started_ > std::chrono::seconds(10))
      restart_delay_ = std::chrono::milliseconds(500);  // it ran well: the next crash is news
    supervise();
  });
}

void DataPlane::stop() {
  stopping_ = true;
  timer_.cancel();
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  // The proxy drains open connections; give it its drain time, then insist.
  for (int i = 0; i < 200; ++i) {
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

std::optional<uint16_t> DataPlane::inbound_port() const {
  std::ifstream in(dir_ / "dataplane.admin");
  std::string admin;
  if (!in || !std::getline(in, admin) || admin.empty()) return std::nullopt;
  HttpCall call;
  call.url = "http://" + admin + "/listeners";
  call.timeout = std::chrono::milliseconds(1000);
  auto r = http_call(call);
  if (!r || r->status != 200) return std::nullopt;
  boost::system::error_code ec;
  auto v = boost::json::parse(r->body, ec);
  if (ec || !v.is_object()) return std::nullopt;
  auto* inbound = v.as_object().if_contains("inbound");
  if (!inbound || !inbound->is_string()) return std::nullopt;
  auto hp = parse_host_port(std::string(inbound->as_string()));
  if (!hp) return std::nullopt;
  return hp->port;
}

}  // namespace weft
