#include "cli/cli.h"

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <iostream>

#include "config/proxy_config.h"
#include "core/logging.h"
#include "identity/certificate_authority.h"
#include "identity/certificate_info.h"
#include "proxy/proxy_server.h"

namespace weft {

namespace {

Millis parse_ttl_flag(const std::string& text, const char* flag) {
  auto d = parse_duration(text);
  if (!d) throw CLI::ValidationError(flag, d.error());
  if (d->count() <= 0) throw CLI::ValidationError(flag, "must be longer than 0");
  return *d;
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{"weft: a service mesh in one binary (proxy, agent, control and operator tools)"};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "debug logging");

  // weft ca init
  auto* ca = app.add_subcommand("ca", "manage the mesh certificate authority");
  ca->require_subcommand(1);
  auto* ca_init =
      ca->add_subcommand("init", "create a root CA (ca.crt, ca.key) for a trust domain");
  std::string trust_domain, key_type = "ed25519", out_dir, ca_ttl = "3650d";
  ca_init->add_option("--trust-domain", trust_domain, "trust domain, e.g. cluster.local")
      ->required();
  ca_init->add_option("--out", out_dir, "directory to write ca.crt and ca.key into")->required();
  ca_init->add_option("--key-type", key_type, "ed25519 (default) or ecdsa-p256");
  ca_init->add_option("--ttl", ca_ttl, "validity, e.g. 3650d");

  // weft cert issue
  auto* cert = app.add_subcommand("cert", "issue and inspect workload certificates");
  cert->require_subcommand(1);
  auto* issue = cert->add_subcommand("issue", "issue a leaf certificate with a SPIFFE ID");
  std::string ca_dir, spiffe_id, cert_out, ttl = "24h", leaf_key_type = "ed25519";
  std::vector<std::string> dns;
  issue->add_option("--ca", ca_dir, "CA directory made by 'weft ca init'")->required();
  issue->add_option("--spiffe-id", spiffe_id, "spiffe://<td>/ns/<ns>/sa/<sa>")->required();
  issue->add_option("--out", cert_out, "directory to write cert.pem, key.pem and ca.crt into")
      ->required();
  issue->add_option("--ttl", ttl, "validity, e.g. 24h");
  issue->add_option("--dns", dns, "extra DNS SAN (repeatable)");
  issue->add_option("--key-type", leaf_key_type, "ed25519 (default) or ecdsa-p256");
  std::string backdate = "1m";
  issue->add_option(
      "--backdate", backdate,
      "start the validity this long before now (clock skew; tests mint expired certs)");
  auto* show = cert->add_subcommand("show", "print a certificate's identity and validity");
  std::string show_path;
  show->add_option("path", show_path, "PEM certificate")->required();

  // weft proxy
  auto* proxy =
      app.add_subcommand("proxy", "run the sidecar / node proxy from a static YAML config");
  std::string config_file, admin_address_path;
  bool check_only = false;
  proxy->add_option("-c,--config", config_file, "YAML config file")->required();
  proxy->add_option("--admin-address-path", admin_address_path,
                    "write the admin address (host:port) to this file once listening");
  proxy->add_flag("--check", check_only, "validate the config and exit");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  init_logging(verbose);

  try {
    if (*ca_init) {
      auto kt = parse_key_type(key_type);
      if (!kt) throw std::runtime_error(kt.error());
      init_ca({trust_domain, *kt, out_dir, parse_ttl_flag(ca_ttl, "--ttl")});
      std::cout << "created CA for trust domain " << trust_domain << " in " << out_dir
                << " (ca.crt, ca.key mode 0600)\n";
      return 0;
    }
    if (*issue) {
      auto kt = parse_key_type(leaf_key_type);
      if (!kt) throw std::runtime_error(kt.error());
      IssueOptions o;
      o.ca_dir = ca_dir;
      o.spiffe_id = spiffe_id;
      o.out_dir = cert_out;
      o.ttl = parse_ttl_flag(ttl, "--ttl");
      o.dns_names = dns;
      o.key_type = *kt;
      o.not_before_offset =
          -std::chrono::duration_cast<std::chrono::seconds>(parse_ttl_flag(backdate, "--backdate"));
      issue_certificate(o);
      auto info = load_certificate_info(std::filesystem::path(cert_out) / "cert.pem");
      std::cout << "issued " << spiffe_id << " in " << cert_out
                << " (cert.pem, key.pem mode 0600, ca.crt)"
                << ", expires " << (info ? format_utc(info->not_after) : "?") << "\n";
      return 0;
    }
    if (*show) {
      auto info = load_certificate_info(show_path);
      if (!info) throw std::runtime_error(info.error());
      std::cout << "subject:    " << info->subject << "\nserial:     " << info->serial_hex
                << "\nspiffe id:  " << info->spiffe_id().value_or("(none)")
                << "\nnot before: " << format_utc(info->not_before)
                << "\nnot after:  " << format_utc(info->not_after)
                << "\nis CA:      " << (info->is_ca ? "yes" : "no") << "\n";
      return 0;
    }
    if (*proxy) {
      if (check_only) {
        load_proxy_config(config_file);
        std::cout << config_file << ": ok\n";
        return 0;
      }
      ProxyServer server({config_file, admin_address_path});
      return server.run();
    }
  } catch (const ConfigError& e) {
    spdlog::error("{}", e.what());
    return 2;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
  return 0;
}

}  // namespace weft
