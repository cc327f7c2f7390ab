#include "cli/network_commands.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/json.hpp>
#include <iostream>
#include <stdexcept>

#include "core/duration.h"
#include "core/host_port.h"
#include "p2p/stun_client.h"

#include <sys/wait.h>
#include <unistd.h>

namespace weft {

namespace asio = boost::asio;
using udp = asio::ip::udp;

namespace {

udp::endpoint resolve(asio::io_context& io, const std::string& text, bool allow_zero) {
  auto hp = parse_host_port(text, allow_zero);
  if (!hp) throw std::runtime_error("'" + text + "': " + hp.error());
  udp::resolver resolver(io);
  boost::system::error_code ec;
  auto results = resolver.resolve(udp::v4(), hp->host, std::to_string(hp->port), ec);
  if (ec || results.empty()) throw std::runtime_error("cannot resolve " + hp->host);
  return *results.begin();
}

std::string text(const udp::endpoint& ep) {
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

}  // namespace

int cmd_stun(const std::vector<std::string>& servers, const std::string& bind,
             const std::string& timeout, bool json_output) {
  asio::io_context io;
  std::vector<udp::endpoint> targets;
  for (const auto& s : servers) targets.push_back(resolve(io, s, false));
  auto wait = parse_duration(timeout);
  if (!wait) throw std::runtime_error("--timeout: " + wait.error());
  auto r = probe_nat(targets, resolve(io, bind, true), *wait);
  if (!r) throw std::runtime_error(r.error());
  if (json_output) {
    boost::json::object o{{"local", text(r->local)},
                          {"reflexive", text(r->reflexive)},
                          {"behind_nat", r->behind_nat()},
                          {"mapping", r->mapping()},
                          {"server_software", r->server_software}};
    if (r->second_server) o["second_server"] = text(*r->second_server);
    if (r->second_reflexive) o["second_reflexive"] = text(*r->second_reflexive);
    std::cout << boost::json::serialize(o) << "\n";
    return 0;
  }
  std::cout << "local       " << text(r->local) << "\n"
            << "reflexive   " << text(r->reflexive) << (r->behind_nat() ? "  (behind NAT)" : "")
            << "\n"
            << "mapping     " << r->mapping();
  if (r->second_server)
    std::cout << "  (" << text(*r->second_server) << " saw "
              << (r->second_reflexive ? text(*r->second_reflexive) : std::string("no answer"))
              << ")";
  std::cout << "\n"
            << "server      " << (r->server_software.empty() ? "-" : r->server_software) << "\n";
  return 0;
}

namespace {

// Runs a program without a shell; returns its exit status, with its output in `out`.
int run_program(const std::vector<std::string>& argv, std::string* out) {
  int pipefd[2];
  if (::pipe(pipefd) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(pipefd[1]);
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof buf)) > 0)
    if (out) out->append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& a : v) s += (s.empty() ? "" : " ") + a;
  return s;
}

}  // namespace

int cmd_iptables(bool install, const iptables::CaptureRules& rules, const std::string& ipv6,
                 bool dry_run) {
  if (const auto bad = iptables::validate(rules); !bad.empty()) throw std::runtime_error(bad);
  std::vector<std::string> binaries{"iptables"};
  if (ipv6 == "on") {
    binaries.push_back("ip6tables");
  } else if (ipv6 == "auto") {
    std::string ignored;
    if (run_program({"ip6tables", "-w", "-t", "nat", "-S", "OUTPUT"}, &ignored) == 0)
      binaries.push_back("ip6tables");
  }
  for (const auto& bin : binaries) {
    const bool v6 = bin == "ip6tables";
    const auto plan = install ? iptables::install_plan(rules, v6) : iptables::remove_plan(v6);
    for (const auto& step : plan) {
      std::vector<std::string> argv{bin, "-w"};
      if (step.only_if_missing) {
        std::vector<std::string> check = argv;
        check.insert(check.end(), step.check.begin(), step.check.end());
        std::string ignored;
        if (!dry_run && run_program(check, &ignored) == 0) continue;  // already there
      }
      argv.insert(argv.end(), step.command.begin(), step.command.end());
      if (dry_run) {
        std::cout << joined(argv) << "\n";
        continue;
      }
      std::string out;
      const int rc = run_program(argv, &out);
      if (rc != 0 && !step.may_fail)
        throw std::runtime_error(joined(argv) + " failed (exit " + std::to_string(rc) +
                                 "): " + out + (rc == 127 ? " (is iptables installed?)" : ""));
      if (rc == 0 && install && step.command.size() > 2 && step.command[2] == "-A")
        std::cout << bin << " " << joined(step.command) << "\n";
    }
  }
  std::cout << (install ? "capture rules installed" : "capture rules removed") << " ("
            << joined(binaries) << ")\n";
  return 0;
}

}  // namespace weft
