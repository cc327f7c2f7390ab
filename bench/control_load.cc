// Registration load for `weft control`: N simulated agents (real Ed25519 keys and CSRs, made
// before the clock starts) register over HTTPS from T threads with one reusable key.
// Prints registrations per second. Usage: control_load URL CA_FILE KEY N THREADS
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>

#include "http/http_client.h"
#include "identity/csr.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s URL CA_FILE KEY N THREADS\n", argv[0]);
    return 2;
  }
  const std::string url = argv[1], ca = argv[2], key = argv[3];
  const int n = std::stoi(argv[4]), threads = std::stoi(argv[5]);
  std::vector<std::string> bodies;
  for (int i = 0; i < n; ++i) {
    auto kp = weft::generate_ed25519();
    bodies.push_back(boost::json::serialize(
        boost::json::object{{"auth_key", key},
                            {"name", "sim-" + std::to_string(i)},
                            {"cluster", "load"},
                            {"public_key", kp.public_pem},
                            {"csr", *weft::make_csr(kp.private_pem, "sim")}}));
  }
  std::atomic<int> next{0}, ok{0}, failed{0};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (int i = next++; i < n; i = next++) {
        weft::HttpCall c;
        c.url = url + "/v1/register";
        c.method = "POST";
        c.body = bodies[static_cast<size_t>(i)];
        c.ca_file = ca;
        auto r = weft::http_call(c);
        (r && r->status == 200 ? ok : failed)++;
      }
    });
  for (auto& t : pool) t.join();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("{\"registered\": %d, \"failed\": %d, \"seconds\": %.3f, \"per_second\": %.1f}\n",
              ok.load(), failed.load(), secs, ok / secs);
  return failed ? 1 : 0;
}
