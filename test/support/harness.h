// Test support: temp dirs, the real weft binary as a child process, an in-process echo server
// and small blocking clients. Everything binds port 0 and polls for readiness.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio.hpp>

namespace weft::test {

namespace fs = std::filesystem;

// True under the ASan build: tests scale their volume down and say so.
bool sanitized();

class TempDir {
 public:
  TempDir();
  ~TempDir();
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs the weft binary to completion.
CommandResult run_weft(const std::vector<std::string>& args);

void write_file(const fs::path& p, const std::string& text);
std::string read_file(const fs::path& p);

struct HttpResult {
  int status = 0;
  std::string body;
};
HttpResult http_request(const std::string& host_port, const std::string& method,
                        const std::string& path);

// A running `weft proxy`.
class WeftProxy {
 public:
  explicit WeftProxy(fs::path config, fs::path workdir, std::vector<std::string> extra_args = {});
  ~WeftProxy();

  // Polls the admin /ready until 200; false (with the log dumped) if it exits or 20 s pass.
  bool wait_ready();
  std::string admin() const { return admin_; }
  uint16_t port(const std::string& listener_key);
  void signal(int sig);
  // Waits for exit; returns the exit code, or -1 on timeout.
  int wait_exit(std::chrono::seconds timeout = std::chrono::seconds(30));
  bool running();
  std::string log() const;
  std::string access_log() const;          // stdout: one JSON line per connection
  uint64_t stat(const std::string& name);  // from /stats
  // Polls /stats until `name` reaches at least `value` (10 s at most); returns the last reading.
  uint64_t wait_stat(const std::string& name, uint64_t value);

 private:
  fs::path config_, workdir_, admin_file_, out_, err_;
  pid_t pid_ = -1;
  std::string admin_;
  int exit_code_ = -1;
};

// Echoes every byte back and passes the client's half-close on after the last byte.
class EchoServer {
 public:
  EchoServer();
  ~EchoServer();
  uint16_t port() const { return port_; }
  uint64_t accepted() const { return accepted_.load(); }
  uint64_t bytes() const { return bytes_.load(); }

 private:
  void accept();
  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::thread thread_;
  uint16_t port_ = 0;
  std::atomic<uint64_t> accepted_{0}, bytes_{0};
};

// A port nothing listens on (bound, then closed).
uint16_t unused_port();

// Blocking client: connects, sends `data`, half-closes, reads until EOF. Throws on error.
std::string echo_roundtrip(uint16_t port, const std::string& data);
std::string echo_roundtrip(const std::string& host, uint16_t port, const std::string& data);

// The CA and identities most tests use, under dir: ca/, client/, server/, other/.
struct Pki {
  explicit Pki(const fs::path& dir, const std::string& trust_domain = "test.local");
  fs::path dir;
  std::string client_id, server_id, other_id;
  std::string identity_yaml(const std::string& who) const;  // "identity: {...}"
};

}  // namespace weft::test
