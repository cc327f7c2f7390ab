#include "cli/cli.h"

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <iostream>
#include <sstream>

#include "agent/agent_server.h"
#include "cli/network_commands.h"
#include "cli/operator_commands.h"
#include "config/proxy_config.h"
#include "control/control_server.h"
#include "control/join_keys.h"
#include "core/logging.h"
#include "identity/certificate_authority.h"
#include "identity/certificate_info.h"
#include "proxy/proxy_server.h"
#include "relay/relay_role.h"

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
  std::string hmac_refresh = "30s";
  proxy->add_option("--hmac-refresh", hmac_refresh,
                    "how often HMAC keys from the agent are fetched again (control may rotate "
                    "them)");

  // weft control
  auto* control =
      app.add_subcommand("control", "run the control plane (join keys, registry, CA, mesh IPs)");
  ControlOptions copt;
  std::string control_data = "weft-control", control_ca, control_listen = "0.0.0.0:8443",
              node_ttl = "24h", control_addr_file;
  control->add_option("--data-dir", control_data, "SQLite database, admin token and TLS files");
  control->add_option(
      "--ca", control_ca,
      "CA directory (ca.crt, ca.key) from 'weft ca init' or a plug-in intermediate");
  control->add_option("--listen", control_listen, "API address (HTTPS)");
  std::string control_stun = "0.0.0.0:3478";
  std::string control_relay = "0.0.0.0:8444";
  control->add_option("--relay-listen", control_relay,
                      "relay (TLS, HTTP upgrade) for agents without a direct path; 'off' disables");
  std::vector<std::string> control_relays;
  control->add_option("--relay", control_relays,
                      "a standalone 'weft relay' (host:port) agents also connect to and fail over "
                      "to, after control's own; repeatable");
  control->add_option("--stun-listen", control_stun,
                      "STUN (UDP) address; the next port up answers too, for NAT mapping "
                      "tests; 'off' disables");
  control->add_flag("--insecure-http", copt.insecure_http,
                    "serve plain HTTP: local development ONLY");
  control->add_option("--mesh-cidr", copt.mesh_cidr, "mesh IP pool; each agent gets a /24 of it");
  control->add_option("--node-cert-ttl", node_ttl, "lifetime of node certificates");
  std::string workload_ttl = "24h";
  control->add_option("--workload-cert-ttl", workload_ttl, "lifetime of workload certificates");
  std::string hmac_grace = "90s";
  control->add_option("--hmac-rotation-grace", hmac_grace,
                      "after an HMAC secret rotation, how long signers keep the previous key "
                      "(longer than the proxies' --hmac-refresh)");
  control->add_option("--change-log-size", copt.change_log_size,
                      "changes kept for watchers to resume from; older ones get a full resync");
  control->add_option("--address-file", control_addr_file,
                      "write the bound host:port here once listening");
  std::string control_heartbeat = "10s";
  control->add_option("--heartbeat-interval", control_heartbeat,
                      "expected agent heartbeat; 3 missed = unhealthy");
  auto* keys = control->add_subcommand("keys", "manage join keys (works on the data dir directly)");

  auto* keys_create = keys->add_subcommand("create", "create a join key; it is shown once");
  std::string key_ttl = "1h", key_cluster, key_id;
  bool key_reusable = false;
  keys_create->add_option("--ttl", key_ttl, "how long the key may be used");
  keys_create->add_flag("--reusable", key_reusable, "allow many agents to join with it");
  keys_create->add_option("--cluster", key_cluster, "only agents of this cluster may use it");
  auto* keys_list =
      keys->add_subcommand("list", "list join keys (hashes only; secrets are never stored)");
  auto* keys_revoke = keys->add_subcommand("revoke", "revoke a join key by id");
  keys_revoke->add_option("id", key_id, "key id from 'keys list'")->required();
  // `weft control keys create --data-dir D` reads naturally: options fall through to `control`.
  for (auto* sub : {keys, keys_create, keys_list, keys_revoke}) sub->fallthrough();

  // weft agent
  auto* agent = app.add_subcommand(
      "agent", "run the node agent (identity, registration, REST API, resources)");
  AgentOptions aopt;
  std::string agent_state, agent_proxies, agent_networks, agent_routes, agent_addr_file, agent_ca;
  agent->add_option("--control", aopt.control_url, "control URL, e.g. https://control:8443")
      ->envname("MESH_CONTROL_URL");
  agent->add_option("--auth-key", aopt.auth_key, "join key for the first registration")
      ->envname("MESH_AUTH_KEY");
  agent->add_option("--state", agent_state, "state directory (default ~/.config/weft)");
  agent->add_option("--port", aopt.api_port, "REST API port");
  agent->add_option("--api-address", aopt.api_address, "REST API address");
  agent->add_option("--quic-port", aopt.quic_port,
                    "UDP port for peer-to-peer QUIC, STUN and path probes (0: any free port)");
  agent
      ->add_option("--p2p", aopt.p2p,
                   "peers reached over P2P QUIC (relay first, then direct): cross-cluster, "
                   "always or off")
      ->check(CLI::IsMember({"cross-cluster", "always", "off"}));
  agent
      ->add_option("--p2p-paths", aopt.p2p_paths,
                   "auto (relay first, then direct) or relay-only (no hole punching: for "
                   "networks that forbid it, and to measure the relay)")
      ->check(CLI::IsMember({"auto", "relay-only"}));
  std::string quic_keepalive = "15s", quic_idle = "60s";
  agent->add_option("--quic-keepalive", quic_keepalive, "QUIC keepalive interval");
  agent->add_option("--quic-idle-timeout", quic_idle, "QUIC idle timeout");
  agent->add_option("--proxies", agent_proxies, "resource proxies: local_port:host:port,...");
  agent->add_option("--networks", agent_networks,
                    "local networks to proxy (CIDRs, comma-separated)");
  agent->add_option("--advertise-routes", agent_routes,
                    "routes to advertise (CIDRs, comma-separated)");
  agent->add_option("--name", aopt.name, "node name (default: host name)");
  agent->add_option("--cluster-id", aopt.cluster_id, "cluster this node belongs to");
  agent->add_option("--control-ca", agent_ca,
                    "CA bundle that signed control's certificate (https)");
  agent
      ->add_option("--api-token", aopt.api_token,
                   "bearer token for API changes (default: <state>/api.token)")
      ->envname("WEFT_AGENT_API_TOKEN");
  agent->add_option("--resource-address", aopt.resource_address, "address resource listeners bind");
  agent
      ->add_option("--access-log", aopt.access_log,
                   "where P2P tunnels' access log lines go: stdout, off or a file path")
      ->capture_default_str();
  agent->add_option("--address-file", agent_addr_file,
                    "write the API's host:port here once listening");
  std::string agent_heartbeat = "10s";
  agent->add_option("--heartbeat-interval", agent_heartbeat,
                    "how often to tell control we are alive");
  std::string agent_hbone = "0.0.0.0:15008";
  agent->add_option("--hbone-listen", agent_hbone,
                    "the data plane's HBONE (mTLS) inbound, where other agents reach resources");
  agent->add_option("--advertise-address", aopt.advertise_address,
                    "address other agents dial for HBONE (default: the --hbone-listen host)");
  agent->add_option("--sds-socket", aopt.sds_socket,
                    "Unix socket serving workload certificates to local sidecars "
                    "(default <state>/sds.sock; 'off' disables)");
  agent
      ->add_option("--sds-allow-uid", aopt.sds_allow_uids,
                   "uid of sidecars allowed on the SDS socket, besides the agent's own and root")
      ->delimiter(',');

  // weft relay
  auto* relay_cmd = app.add_subcommand(
      "relay", "run a standalone relay (TLS) and STUN server; control says who may use it");
  RelayRoleOptions ropt;
  std::string relay_listen = "0.0.0.0:8443", relay_stun = "0.0.0.0:3478",
              relay_admin = "127.0.0.1:15030";
  relay_cmd->add_option("--listen", relay_listen,
                        "relay address (TLS; 443 crosses most firewalls)");
  relay_cmd->add_option("--stun-listen", relay_stun, "STUN (UDP) address, next port up too; 'off'");
  relay_cmd->add_option("--advertise", ropt.advertise,
                        "host:port agents dial; control announces it (default: --listen if not "
                        "a wildcard)");
  relay_cmd->add_option("--admin", relay_admin, "/ready and /metrics (plain HTTP; keep it local)");
  relay_cmd
      ->add_option("--tls-dir", ropt.tls_dir,
                   "cert.pem, key.pem, ca.crt from 'weft cert issue' (mesh CA); reread on SIGHUP")
      ->required();
  relay_cmd->add_option("--control", ropt.control_url, "control URL, e.g. https://control:8443")
      ->required();
  relay_cmd
      ->add_option("--token-file", ropt.token_file,
                   "operator token (control's <data-dir>/admin.token), to read the member list")
      ->required();
  relay_cmd->add_option("--rate-limit", ropt.rate_bytes_per_s, "bytes/s per client");
  relay_cmd->add_option("--address-file", ropt.address_file,
                        "write the bound relay host:port here (.stun, .admin beside it)");

  // weft iptables
  auto* ipt = app.add_subcommand("iptables", "transparent capture rules (nat table, idempotent)");
  ipt->require_subcommand(1);
  auto* ipt_install =
      ipt->add_subcommand("install", "redirect this host's (or pod's) TCP to the proxy");
  auto* ipt_remove = ipt->add_subcommand("remove", "remove every capture rule and chain");
  iptables::CaptureRules ipt_rules;
  std::string ipt_ports, ipt_cidrs, ipt_v6 = "auto";
  bool ipt_dry = false;
  ipt_install
      ->add_option("--proxy-uid", ipt_rules.proxy_uid, "uid the proxy runs as (never captured)")
      ->required();
  ipt_install->add_option("--exclude-ports", ipt_ports,
                          "outbound ports left alone, comma-separated");
  ipt_install->add_option("--exclude-cidrs", ipt_cidrs, "destinations left alone, comma-separated");
  ipt_install->add_flag("--inbound", ipt_rules.inbound,
                        "also capture inbound TCP to --inbound-port");
  ipt_install->add_option("--outbound-port", ipt_rules.outbound_port,
                          "the proxy's transparent port");
  ipt_install->add_option("--inbound-port", ipt_rules.inbound_port,
                          "the proxy's inbound capture port");
  for (auto* sub : {ipt_install, ipt_remove}) {
    sub->add_option("--ipv6", ipt_v6, "auto (if ip6tables has nat), on or off")
        ->check(CLI::IsMember({"auto", "on", "off"}));
    sub->add_flag("--dry-run", ipt_dry, "print the commands instead of running them");
  }

  // operator verbs
  std::string output = "table";
  auto* stun_cmd = app.add_subcommand(
      "stun", "ask STUN servers for this host's reflexive address and NAT mapping behaviour");
  std::vector<std::string> stun_servers;
  std::string stun_bind = "0.0.0.0:0", stun_timeout = "3s";
  stun_cmd->add_option("servers", stun_servers, "host:port of one or two STUN servers")
      ->required()
      ->expected(1, 2);
  stun_cmd->add_option("--bind", stun_bind, "local UDP address to probe from");
  stun_cmd->add_option("--timeout", stun_timeout, "give up after this long");
  stun_cmd->add_option("-o,--output", output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
  ControlTarget ctl;
  auto* status = app.add_subcommand("status", "agents, their mesh IPs and health, from control");
  status->add_option("--control", ctl.url, "control URL")->envname("MESH_CONTROL_URL");
  status->add_option("--token", ctl.token, "operator token (control's <data-dir>/admin.token)")
      ->envname("WEFT_CONTROL_TOKEN");
  status->add_option("--ca", ctl.ca_file, "mesh CA bundle, to verify control")->envname("WEFT_CA");
  status->add_option("-o,--output", output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
  auto* services = app.add_subcommand("services", "services, their endpoints and health");
  services->add_option("--control", ctl.url, "control URL")->envname("MESH_CONTROL_URL");
  services->add_option("--token", ctl.token, "operator token")->envname("WEFT_CONTROL_TOKEN");
  services->add_option("--ca", ctl.ca_file, "mesh CA bundle, to verify control")
      ->envname("WEFT_CA");
  services->add_option("-o,--output", output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
  auto* keys_top = app.add_subcommand("keys", "join keys, through control's API");
  keys_top->require_subcommand(1);
  keys_top->add_option("--control", ctl.url, "control URL")->envname("MESH_CONTROL_URL");
  keys_top->add_option("--token", ctl.token, "operator token")->envname("WEFT_CONTROL_TOKEN");
  keys_top->add_option("--ca", ctl.ca_file, "mesh CA bundle, to verify control")
      ->envname("WEFT_CA");
  keys_top->add_option("-o,--output", output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
  auto* keys_top_create = keys_top->add_subcommand("create", "create a join key");
  std::string top_ttl = "1h", top_cluster;
  bool top_reusable = false;
  keys_top_create->add_option("--ttl", top_ttl, "how long the key may be used");
  keys_top_create->add_flag("--reusable", top_reusable, "allow many agents to join with it");
  keys_top_create->add_option("--cluster", top_cluster, "only agents of this cluster may use it");
  keys_top_create->fallthrough();
  AgentTarget agt;
  auto* resources = app.add_subcommand("resources", "list, add and remove an agent's resources");
  resources->require_subcommand(1);
  resources->add_option("--agent", agt.url, "agent API URL")->envname("WEFT_AGENT_URL");
  resources->add_option("--token", agt.token, "agent API token (<state>/api.token)")
      ->envname("WEFT_AGENT_API_TOKEN");
  resources->add_option("-o,--output", output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
  auto* res_list = resources->add_subcommand("list", "list resources");
  auto* res_add = resources->add_subcommand("add", "add a resource, live");
  std::string res_id, res_target, res_proto = "tcp";
  int res_port = 0;
  res_add->add_option("--id", res_id, "resource id (default: generated)");
  res_add->add_option("--port", res_port, "port the agent listens on")->required();
  res_add->add_option("--target", res_target, "backend host:port")->required();
  res_add->add_option("--protocol", res_proto, "tcp, http or https");
  auto* res_rm = resources->add_subcommand("rm", "remove a resource (its connections drain)");
  res_rm->add_option("id", res_id, "resource id")->required();
  for (auto* sub : {res_list, res_add, res_rm}) sub->fallthrough();

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
    if (*control) {
      auto pool = parse_mesh_pool(copt.mesh_cidr);
      if (!pool) throw std::runtime_error(pool.error());
      if (*keys) {
        auto store = open_sqlite_store(control_data, nullptr);
        if (*keys_create) {
          auto k =
              create_join_key(*store, parse_ttl_flag(key_ttl, "--ttl"), key_reusable, key_cluster);
          std::cout << k.secret << "\n";
          std::cerr << "join key " << k.record.id
                    << (k.record.reusable ? " (reusable)" : " (single use)") << ", expires "
                    << format_utc(static_cast<std::time_t>(k.record.expires_at / 1000))
                    << (key_cluster.empty() ? "" : ", cluster " + key_cluster)
                    << "; it is shown only now\n";
        } else if (*keys_list) {
          std::printf("%-14s %-10s %-8s %-6s %-22s %s\n", "ID", "CLUSTER", "REUSABLE", "USES",
                      "EXPIRES", "STATE");
          const auto now = std::time(nullptr);
          for (const auto& k : store->list_join_keys())
            std::printf("%-14s %-10s %-8s %-6lld %-22s %s\n", k.id.c_str(),
                        k.cluster.empty() ? "-" : k.cluster.c_str(), k.reusable ? "yes" : "no",
                        static_cast<long long>(k.uses),
                        format_utc(static_cast<std::time_t>(k.expires_at / 1000)).c_str(),
                        k.revoked ? "revoked" : (k.expires_at / 1000 < now ? "expired" : "active"));
        } else if (*keys_revoke) {
          if (!store->revoke_join_key(key_id))
            throw std::runtime_error("no join key with id " + key_id);
          std::cout << "revoked " << key_id << "\n";
        }
        return 0;
      }
      auto listen = parse_host_port(control_listen, true);
      if (!listen) throw std::runtime_error("--listen: " + listen.error());
      copt.data_dir = control_data;
      copt.ca_dir = control_ca;
      copt.listen = *listen;
      copt.node_cert_ttl = parse_ttl_flag(node_ttl, "--node-cert-ttl");
      copt.workload_cert_ttl = parse_ttl_flag(workload_ttl, "--workload-cert-ttl");
      copt.hmac_rotation_grace = parse_ttl_flag(hmac_grace, "--hmac-rotation-grace");
      copt.address_file = control_addr_file;
      if (control_relay == "off") {
        copt.relay_listen.reset();
      } else {
        auto relay = parse_host_port(control_relay, true);
        if (!relay) throw std::runtime_error("--relay-listen: " + relay.error());
        copt.relay_listen = *relay;
      }
      if (control_stun == "off") {
        copt.stun_listen.reset();
      } else {
        auto stun = parse_host_port(control_stun, true);
        if (!stun) throw std::runtime_error("--stun-listen: " + stun.error());
        copt.stun_listen = *stun;
      }
      copt.heartbeat_interval = parse_ttl_flag(control_heartbeat, "--heartbeat-interval");
      for (const auto& r : control_relays) {
        auto hp = parse_host_port(r);
        if (!hp) throw std::runtime_error("--relay " + r + ": " + hp.error());
        copt.relays.push_back(*hp);
      }
      ControlServer server(copt);
      return server.run();
    }
    if (*relay_cmd) {
      const auto address = [](const std::string& flag, const std::string& v) {
        auto hp = parse_host_port(v, true);
        if (!hp) throw std::runtime_error(flag + ": " + hp.error());
        return *hp;
      };
      ropt.listen = address("--listen", relay_listen);
      ropt.admin = address("--admin", relay_admin);
      if (!ropt.advertise.empty()) address("--advertise", ropt.advertise);
      if (relay_stun == "off")
        ropt.stun_listen.reset();
      else
        ropt.stun_listen = address("--stun-listen", relay_stun);
      return run_relay(ropt);
    }
    if (*ipt) {
      const auto split = [](const std::string& s) {
        std::vector<std::string> out;
        std::stringstream ss(s);
        for (std::string item; std::getline(ss, item, ',');)
          if (!item.empty()) out.push_back(item);
        return out;
      };
      for (const auto& p : split(ipt_ports)) {
        auto hp = parse_host_port("x:" + p);
        if (!hp || hp->port == 0)
          throw std::runtime_error("--exclude-ports: '" + p + "' is not a port");
        ipt_rules.exclude_ports.push_back(hp->port);
      }
      ipt_rules.exclude_cidrs = split(ipt_cidrs);
      return cmd_iptables(ipt_install->parsed(), ipt_rules, ipt_v6, ipt_dry);
    }
    if (*stun_cmd) return cmd_stun(stun_servers, stun_bind, stun_timeout, output == "json");
    if (*status) return cmd_status(ctl, output == "json");
    if (*services) return cmd_services(ctl, output == "json");
    if (*keys_top_create)
      return cmd_keys_create(ctl, top_ttl, top_reusable, top_cluster, output == "json");
    if (*resources) {
      if (*res_list) return cmd_resources_list(agt, output == "json");
      if (*res_add)
        return cmd_resources_add(agt, res_id, res_port, res_target, res_proto, output == "json");
      if (*res_rm) return cmd_resources_rm(agt, res_id);
    }
    if (*agent) {
      const auto split = [](const std::string& s) {
        std::vector<std::string> out;
        std::stringstream ss(s);
        for (std::string item; std::getline(ss, item, ',');)
          if (!item.empty()) out.push_back(item);
        return out;
      };
      for (const auto& rule : split(agent_proxies)) {
        auto r = parse_proxy_rule(rule);
        if (!r) throw std::runtime_error("--proxies: " + r.error());
        aopt.proxies.push_back(*r);
      }
      aopt.networks = split(agent_networks);
      aopt.advertise_routes = split(agent_routes);
      if (agent_state.empty()) {
        const char* home = std::getenv("HOME");
        agent_state = std::string(home ? home : ".") + "/.config/weft";
      }
      aopt.state_dir = agent_state;
      aopt.control_ca = agent_ca;
      aopt.address_file = agent_addr_file;
      aopt.heartbeat_interval = parse_ttl_flag(agent_heartbeat, "--heartbeat-interval");
      aopt.quic_keepalive = parse_ttl_flag(quic_keepalive, "--quic-keepalive");
      aopt.quic_idle_timeout = parse_ttl_flag(quic_idle, "--quic-idle-timeout");
      auto hbone = parse_host_port(agent_hbone, true);
      if (!hbone) throw std::runtime_error("--hbone-listen: " + hbone.error());
      aopt.hbone_listen = *hbone;
      AgentServer server(aopt);
      return server.run();
    }
    if (*proxy) {
      if (check_only) {
        load_proxy_config(config_file);
        std::cout << config_file << ": ok\n";
        return 0;
      }
      ProxyServer server(
          {config_file, admin_address_path, parse_ttl_flag(hmac_refresh, "--hmac-refresh")});
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
