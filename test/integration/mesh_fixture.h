// A two-proxy mesh on loopback: the app's sidecar A (client identity) and B (server identity)
// in front of an echo server. Tests start what they need and read each proxy's logs and stats.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "support/harness.h"

namespace weft::test {

class MeshTest : public ::testing::Test {
 protected:
  MeshTest() : pki_(dir_ / "pki") {}

  // B: inbound HBONE in front of `echo_` (target authority "echo:<port>"), allowing `allow`.
  std::unique_ptr<WeftProxy> start_server(const std::string& allow_yaml = "",
                                          const std::string& extra_targets = "",
                                          const std::string& listen = "127.0.0.1:0",
                                          const std::string& name = "b");
  std::string server_config(const std::string& allow_yaml, const std::string& extra_targets,
                            const std::string& listen) const;

  // A: outbound listener "app" to service "echo" at B's inbound port.
  std::unique_ptr<WeftProxy> start_client(uint16_t b_port, const std::string& who = "client",
                                          const std::string& authority = "",
                                          const std::string& name = "a",
                                          const std::string& extra = "");

  std::string echo_authority() const { return "127.0.0.1:" + std::to_string(echo_.port()); }

  TempDir dir_;
  Pki pki_;
  EchoServer echo_;
};

}  // namespace weft::test
