#include "support/harness.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace weft::test {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

bool sanitized() { return std::getenv("WEFT_SANITIZED") != nullptr; }

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "weft-test-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  if (!std::getenv("WEFT_KEEP_TEST_DIRS")) fs::remove_all(path_, ec);
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {

pid_t spawn(const std::vector<std::string>& args, const fs::path& out, const fs::path& err) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot spawn " + args[0]);
  return pid;
}

}  // namespace

CommandResult run_weft(const std::vector<std::string>& args) {
  TempDir tmp;
  std::vector<std::string> full{WEFT_BINARY};
  full.insert(full.end(), args.begin(), args.end());
  const pid_t pid = spawn(full, tmp / "out", tmp / "out2");
  int status = 0;
  ::waitpid(pid, &status, 0);
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.output = read_file(tmp / "out") + read_file(tmp / "out2");
  return r;
}

HttpResult http_request(const std::string& host_port, const std::string& method,
                        const std::string& path) {
  asio::io_context io;
  tcp::socket s(io);
  const auto colon = host_port.rfind(':');
  s.connect(tcp::endpoint(asio::ip::make_address(host_port.substr(0, colon)),
                          static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1)))));
  const std::string req = method + " " + path +
                          " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
  asio::write(s, asio::buffer(req));
  std::string resp;
  boost::system::error_code ec;
  char buf[8192];
  for (;;) {
    size_t n = s.read_some(asio::buffer(buf), ec);
    resp.append(buf, n);
    if (ec) break;
  }
  HttpResult r;
  if (resp.size() > 12) r.status = std::stoi(resp.substr(9, 3));
  const auto body = resp.find("\r\n\r\n");
  if (body != std::string::npos) r.body = resp.substr(body + 4);
  return r;
}

WeftProxy::WeftProxy(fs::path config, fs::path workdir, std::vector<std::string> extra_args)
    : config_(std::move(config)), workdir_(std::move(workdir)) {
  static int counter = 0;
  const std::string tag = config_.stem().string() + "-" + std::to_string(counter++);
  admin_file_ = workdir_ / (tag + ".admin");
  out_ = workdir_ / (tag + ".out");
  err_ = workdir_ / (tag + ".err");
  std::vector<std::string> args{
      WEFT_BINARY, "proxy", "-c", config_.string(), "--admin-address-path", admin_file_.string()};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  pid_ = spawn(args, out_, err_);
}

WeftProxy::~WeftProxy() {
  if (pid_ > 0 && running()) {
    // SIGTERM with a short drain, so sanitizers get to report leaks at exit.
    ::kill(pid_, SIGTERM);
    if (wait_exit(std::chrono::seconds(15)) < 0) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
  }
  const std::string err = log();
  for (const char* bad : {"AddressSanitizer", "LeakSanitizer", "runtime error:"}) {
    if (err.find(bad) != std::string::npos)
      ADD_FAILURE() << "weft proxy reported " << bad << ":\n" << err;
  }
}

bool WeftProxy::running() {
  if (pid_ <= 0) return false;
  int st = 0;
  const pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    exit_code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    pid_ = -1;
    return false;
  }
  return true;
}

bool WeftProxy::wait_ready() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (!running()) {
      std::fprintf(stderr, "weft proxy exited early (%d):\n%s\n", exit_code_, log().c_str());
      return false;
    }
    if (admin_.empty() && fs::exists(admin_file_)) {
      std::string a = read_file(admin_file_);
      while (!a.empty() && (a.back() == '\n')) a.pop_back();
      admin_ = a;
    }
    if (!admin_.empty()) {
      try {
        if (http_request(admin_, "GET", "/ready").status == 200) return true;
      } catch (const std::exception&) {
      }
    }
    std::this_thread::sleep_for(
        std::chrono::milliseconds(20));  // polling interval, not a wait-and-hope
  }
  std::fprintf(stderr, "weft proxy not ready in 20 s:\n%s\n", log().c_str());
  return false;
}

uint16_t WeftProxy::port(const std::string& key) {
  auto v = boost::json::parse(http_request(admin_, "GET", "/listeners").body);
  const std::string addr = v.as_object().at(key).as_string().c_str();
  return static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
}

uint64_t WeftProxy::stat(const std::string& name) {
  auto v = boost::json::parse(http_request(admin_, "GET", "/stats").body);
  return v.as_object().at(name).to_number<uint64_t>();
}

uint64_t WeftProxy::wait_stat(const std::string& name, uint64_t value) {
  uint64_t v = stat(name);
  for (int i = 0; i < 1000 && v < value; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling interval
    v = stat(name);
  }
  return v;
}

void WeftProxy::signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

int WeftProxy::wait_exit(std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!running()) return exit_code_;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

std::string WeftProxy::log() const { return read_file(err_); }
std::string WeftProxy::access_log() const { return read_file(out_); }

EchoServer::EchoServer() : acceptor_(io_, tcp::endpoint(asio::ip::address_v4::loopback(), 0)) {
  port_ = acceptor_.local_endpoint().port();
  accept();
  thread_ = std::thread([this] { io_.run(); });
}

EchoServer::~EchoServer() {
  io_.stop();
  thread_.join();
}

namespace {

struct EchoSession : std::enable_shared_from_this<EchoSession> {
  EchoSession(tcp::socket s, std::atomic<uint64_t>& bytes) : sock(std::move(s)), bytes(bytes) {}
  void read() {
    sock.async_read_some(asio::buffer(buf),
                         [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                           if (ec) {
                             boost::system::error_code ignored;
                             self->sock.shutdown(tcp::socket::shutdown_send, ignored);
                             return;
                           }
                           self->bytes += n;
                           asio::async_write(self->sock, asio::buffer(self->buf.data(), n),
                                             [self](boost::system::error_code ec, size_t) {
                                               if (!ec) self->read();
                                             });
                         });
  }
  tcp::socket sock;
  std::atomic<uint64_t>& bytes;
  std::array<char, 65536> buf;
};

}  // namespace

void EchoServer::accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket s) {
    if (ec) return;
    ++accepted_;
    std::make_shared<EchoSession>(std::move(s), bytes_)->read();
    accept();
  });
}

uint16_t unused_port() {
  asio::io_context io;
  tcp::acceptor a(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  return a.local_endpoint().port();
}

std::string echo_roundtrip(uint16_t port, const std::string& data) {
  return echo_roundtrip("127.0.0.1", port, data);
}

std::string echo_roundtrip(const std::string& host, uint16_t port, const std::string& data) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(asio::ip::make_address(host), port));
  boost::system::error_code ec;
  asio::write(s, asio::buffer(data), ec);
  s.shutdown(tcp::socket::shutdown_send, ec);
  std::string out;
  char buf[65536];
  for (;;) {
    size_t n = s.read_some(asio::buffer(buf), ec);
    out.append(buf, n);
    // A refused connection may end in a reset rather than a FIN (the proxy closed it with our
    // bytes unread); either way the caller checks what arrived.
    if (ec == asio::error::eof || ec == asio::error::connection_reset) break;
    if (ec) throw boost::system::system_error(ec);
  }
  return out;
}

Pki::Pki(const fs::path& d, const std::string& td) : dir(d) {
  client_id = "spiffe://" + td + "/ns/default/sa/client";
  server_id = "spiffe://" + td + "/ns/default/sa/server";
  other_id = "spiffe://" + td + "/ns/default/sa/other";
  auto check = [](const CommandResult& r) {
    if (r.exit_code != 0) throw std::runtime_error("weft failed: " + r.output);
  };
  check(run_weft({"ca", "init", "--trust-domain", td, "--out", (dir / "ca").string()}));
  check(run_weft({"cert", "issue", "--ca", (dir / "ca").string(), "--spiffe-id", client_id, "--out",
                  (dir / "client").string()}));
  check(run_weft({"cert", "issue", "--ca", (dir / "ca").string(), "--spiffe-id", server_id, "--out",
                  (dir / "server").string()}));
  check(run_weft({"cert", "issue", "--ca", (dir / "ca").string(), "--spiffe-id", other_id, "--out",
                  (dir / "other").string()}));
}

std::string Pki::identity_yaml(const std::string& who) const {
  const fs::path d = dir / who;
  return "identity: {cert: " + (d / "cert.pem").string() + ", key: " + (d / "key.pem").string() +
         ", ca: " + (d / "ca.crt").string() + "}\n";
}

}  // namespace weft::test
