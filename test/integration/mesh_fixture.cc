#include "integration/mesh_fixture.h"

namespace weft::test {

std::string MeshTest::server_config(const std::string& allow_yaml, const std::string& extra_targets,
                                    const std::string& listen) const {
  return pki_.identity_yaml("server") +
         "workers: 2\nadmin: {listen: 127.0.0.1:0}\ndrain_timeout: 10s\n"
         "inbound:\n  listen: " +
         listen +
         "\n  targets:\n"
         "    - authority: " +
         echo_authority() + "\n      address: " + echo_authority() + "\n" +
         (allow_yaml.empty() ? "      allow: [" + pki_.client_id + "]\n" : allow_yaml) +
         extra_targets;
}

std::unique_ptr<WeftProxy> MeshTest::start_server(const std::string& allow_yaml,
                                                  const std::string& extra_targets,
                                                  const std::string& listen,
                                                  const std::string& name) {
  const auto path = dir_ / (name + ".yaml");
  write_file(path, server_config(allow_yaml, extra_targets, listen));
  auto p = std::make_unique<WeftProxy>(path, dir_.path());
  EXPECT_TRUE(p->wait_ready());
  return p;
}

std::unique_ptr<WeftProxy> MeshTest::start_client(uint16_t b_port, const std::string& who,
                                                  const std::string& authority,
                                                  const std::string& name,
                                                  const std::string& extra) {
  const auto path = dir_ / (name + ".yaml");
  write_file(path, pki_.identity_yaml(who) +
                       "workers: 2\nadmin: {listen: 127.0.0.1:0}\ndrain_timeout: 10s\n"
                       "services:\n  - name: echo\n    addresses: [127.0.0.1:" +
                       std::to_string(b_port) +
                       "]\n    authority: " + (authority.empty() ? echo_authority() : authority) +
                       "\n    spiffe_ids: [" + pki_.server_id +
                       "]\n"
                       "outbound:\n  - {name: app, listen: 127.0.0.1:0, service: echo}\n" +
                       extra);
  auto p = std::make_unique<WeftProxy>(path, dir_.path());
  EXPECT_TRUE(p->wait_ready());
  return p;
}

}  // namespace weft::test
