// The operator's commands, run as a user would run them.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "support/harness.h"

namespace weft::test {
namespace {

mode_t mode_of(const fs::path& p) {
  struct stat st {};
  ::stat(p.c_str(), &st);
  return st.st_mode & 0777;
}

TEST(Cli, CaInitAndCertIssueWriteKeysPrivately) {
  TempDir d;
  for (const char* kt : {"ed25519", "ecdsa-p256"}) {
    const auto ca = d / (std::string("ca-") + kt);
    auto r = run_weft(
        {"ca", "init", "--trust-domain", "corp.example", "--out", ca.string(), "--key-type", kt});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(mode_of(ca / "ca.key"), 0600u);
    const auto leaf = d / (std::string("leaf-") + kt);
    r = run_weft({"cert", "issue", "--ca", ca.string(), "--spiffe-id",
                  "spiffe://corp.example/ns/prod/sa/web", "--out", leaf.string(), "--ttl", "2h",
                  "--dns", "web.prod.svc", "--key-type", kt});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(mode_of(leaf / "key.pem"), 0600u);
    EXPECT_EQ(r.output.find("PRIVATE KEY"), std::string::npos);
    r = run_weft({"cert", "show", (leaf / "cert.pem").string()});
    EXPECT_NE(r.output.find("spiffe://corp.example/ns/prod/sa/web"), std::string::npos) << r.output;
  }
  // openssl agrees the chain verifies.
  const std::string cmd = "openssl verify -CAfile " + (d / "ca-ed25519" / "ca.crt").string() + " " +
                          (d / "leaf-ed25519" / "cert.pem").string() + " >/dev/null 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
}

TEST(Cli, BadSpiffeIdsAreRejectedShowingTheExpectedForm) {
  TempDir d;
  ASSERT_EQ(run_weft({"ca", "init", "--trust-domain", "td.local", "--out", (d / "ca").string()})
                .exit_code,
            0);
  for (const std::string bad :
       {"spiffe://td.local/ns/a/sa/b/", "spiffe://td.local/ns/a", "http://td.local/ns/a/sa/b",
        "spiffe://td.local/ns//sa/b", "spiffe://TD/ns/a/sa/b", "spiffe://other.local/ns/a/sa/b"}) {
    auto r = run_weft({"cert", "issue", "--ca", (d / "ca").string(), "--spiffe-id", bad, "--out",
                       (d / "x").string()});
    EXPECT_NE(r.exit_code, 0) << bad;
    const bool explains =
        r.output.find("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>") !=
            std::string::npos ||
        r.output.find("outside this CA's trust domain") != std::string::npos;
    EXPECT_TRUE(explains) << r.output;
  }
}

TEST(Cli, CaInitRefusesToOverwrite) {
  TempDir d;
  ASSERT_EQ(run_weft({"ca", "init", "--trust-domain", "td.local", "--out", (d / "ca").string()})
                .exit_code,
            0);
  auto r = run_weft({"ca", "init", "--trust-domain", "td.local", "--out", (d / "ca").string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("refusing to overwrite"), std::string::npos);
}

TEST(Cli, BadConfigAtStartupNamesFileLineFieldAndFix) {
  TempDir d;
  const auto cfg = d / "bad.yaml";
  write_file(cfg,
             "admin: {listen: 127.0.0.1:0}\nl4:\n  - name: x\n    listen: 127.0.0.1:0\n    "
             "upstream: 127.0.0.1:99999\n");
  auto r = run_weft({"proxy", "-c", cfg.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find(cfg.string() + ":5:15: field 'l4[0].upstream'"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("port must be a number from 1 to 65535"), std::string::npos) << r.output;

  write_file(cfg, "admin: {listen: 0.0.0.0:15000}\nl4: []\n");
  r = run_weft({"proxy", "-c", cfg.string()});
  EXPECT_NE(r.output.find("loopback"), std::string::npos) << r.output;

  write_file(cfg, "outbound:\n  - {name: a, listen: 127.0.0.1:0, service: nope}\n");
  r = run_weft({"proxy", "-c", cfg.string(), "--check"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("no service named 'nope'"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace weft::test
