#include "control/control_server.h"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <boost/asio/ssl.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <csignal>
#include <fstream>
#include <sstream>

#include "control/join_keys.h"
#include "http/json_fields.h"
#include "identity/certificate_authority.h"

namespace weft {

namespace json = boost::json;

namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<SigningCa> load_ca(const std::filesystem::path& dir) {
  if (dir.empty())
    return make_error("--ca is required: a directory with ca.crt and ca.key (weft ca init)");
  return SigningCa::load(dir);
}

// Control's own serving certificate, minted from the mesh CA at every start.
std::shared_ptr<boost::asio::ssl::context> make_tls(const SigningCa& ca,
                                                    const std::filesystem::path& dir) {
  auto keys = generate_ed25519();
  auto csr = make_csr(keys.private_pem, "weft control");
  auto cert = ca.sign(*csr, "spiffe://" + ca.trust_domain() + "/ns/weft-system/sa/control",
                      std::chrono::hours(24 * 30));
  if (!cert) throw std::runtime_error("cannot issue control's certificate: " + cert.error());
  std::filesystem::create_directories(dir);
  write_file_atomic(dir / "control.key", keys.private_pem, 0600);
  write_file_atomic(dir / "control.crt", *cert + ca.bundle_pem(), 0644);
  write_file_atomic(dir / "ca.crt", ca.bundle_pem(), 0644);
  auto ctx = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
  ctx->use_certificate_chain_file((dir / "control.crt").string());
  ctx->use_private_key_file((dir / "control.key").string(), boost::asio::ssl::context::pem);
  ctx->load_verify_file((dir / "ca.crt").string());
  // Client certificates are optional: registration comes before a node has one.
  SSL_CTX_set_verify(ctx->native_handle(), SSL_VERIFY_PEER, nullptr);
  return ctx;
}

json::object agent_json(const AgentRecord& a, const MeshPool& pool, const std::string& td,
                        int64_t healthy_after = 0) {
  return {{"id", a.id},
          {"healthy", a.last_seen >= healthy_after},
          {"name", a.name},
          {"cluster", a.cluster},
          {"mesh_ip", pool.agent_ip(a.block)},
          {"mesh_block", pool.block_cidr(a.block)},
          {"spiffe_id", "spiffe://" + td + "/cluster/" +
                            (a.cluster.empty() ? "default" : a.cluster) + "/node/" + a.id},
          {"registered_at_ms", a.registered_at},
          {"last_seen_ms", a.last_seen}};
}

bool valid_label(const std::string& s) {
  if (s.empty() || s.size() > 63) return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'))
      return false;
  return true;
}

}  // namespace

std::string ControlServer::load_or_create_admin_token(const std::filesystem::path& data_dir) {
  const auto path = data_dir / "admin.token";
  std::ifstream in(path);
  std::string token;
  if (in && std::getline(in, token) && !token.empty()) return token;
  std::filesystem::create_directories(data_dir);
  token = "wat_" + random_hex(24);
  write_file_atomic(path, token + "\n", 0600);
  return token;
}

ControlServer::ControlServer(ControlOptions options) : options_(std::move(options)), signals_(io_) {
  auto pool = parse_mesh_pool(options_.mesh_cidr);
  if (!pool) throw std::runtime_error(pool.error());
  pool_ = *pool;
  auto ca = load_ca(options_.ca_dir);
  if (!ca) throw std::runtime_error(ca.error());
  ca_ = *ca;
  store_ = open_sqlite_store(options_.data_dir, &pool_);
  admin_token_ = load_or_create_admin_token(options_.data_dir);
  std::shared_ptr<boost::asio::ssl::context> tls;
  if (options_.insecure_http) {
    spdlog::warn(
        "*** --insecure-http: the control API is PLAIN HTTP. Join keys and certificates cross the "
        "network unencrypted. For local development only. ***");
  } else {
    tls = make_tls(ca_, options_.data_dir / "tls");
  }
  auto http = HttpServer::bind(io_, options_.listen, tls,
                               [this](const HttpRequest& r) { return handle(r); });
  if (!http) throw std::runtime_error("control API: " + http.error());
  http_ = std::move(*http);
  const std::string bound = HostPort{options_.listen.host, http_->port()}.to_string();
  if (!options_.address_file.empty()) write_file_atomic(options_.address_file, bound + "\n", 0644);
  spdlog::info(
      "weft control ready on {}://{} trust domain {} mesh pool {} ({} agents registered), data in "
      "{}",
      tls ? "https" : "http", bound, ca_.trust_domain(), pool_.cidr(), store_->list_agents().size(),
      options_.data_dir.string());
  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.async_wait([this](const boost::system::error_code& ec, int) {
    if (ec) return;
    spdlog::info("control: shutting down");
    http_->close();
    io_.stop();
  });
}

int ControlServer::run() {
  io_.run();
  return 0;
}

bool ControlServer::is_operator(const HttpRequest& r) const {
  const std::string want = "Bearer " + admin_token_;
  return r.authorization.size() == want.size() &&
         CRYPTO_memcmp(r.authorization.data(), want.data(), want.size()) == 0;
}

HttpResponse ControlServer::handle(const HttpRequest& r) {
  try {
    if (r.path == "/health") return {200, "{\"status\":\"ok\"}\n"};
    if (r.path == "/v1/trust-bundle") return {200, ca_.bundle_pem(), "application/x-pem-file"};
    if (r.path == "/v1/register") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_register(r);
    }
    if (r.path == "/v1/heartbeat") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_heartbeat(r);
    }
    if (r.path == "/v1/agents" || r.path == "/v1/keys") {
      if (!is_operator(r))
        return json_error(
            401, "missing or wrong bearer token (the operator token is in <data-dir>/admin.token)");
      if (r.path == "/v1/agents" && r.method == "GET") return handle_agents();
      if (r.path == "/v1/keys" && r.method == "POST") return handle_create_key(r);
      return json_error(405, "method not allowed");
    }
    return json_error(404, "no such endpoint: " + r.path);
  } catch (const std::exception& e) {
    spdlog::error("control: {} {}: {}", r.method, r.path, e.what());
    return json_error(500, "internal error; see the control log");
  }
}

HttpResponse ControlServer::handle_register(const HttpRequest& r) {
  auto f = JsonFields::parse(r.body, {"auth_key", "name", "cluster", "public_key", "csr"});
  if (!f) return json_error(400, f.error());
  std::string values[5];
  const char* names[5] = {"auth_key", "name", "cluster", "public_key", "csr"};
  for (int i = 0; i < 5; ++i) {
    auto v = f->string(names[i]);
    if (!v) return json_error(400, v.error(), names[i]);
    values[i] = v->value_or("");
  }
  auto& [auth_key, name, cluster, public_key, csr] = values;
  if (public_key.empty())
    return json_error(400, "public_key is required (the node's Ed25519 key, PEM)", "public_key");
  if (csr.empty()) return json_error(400, "csr is required (signed with the node key)", "csr");
  if (name.empty()) name = "node";
  if (!valid_label(name)) return json_error(400, "name must be 1-63 of [a-z0-9-._]", "name");
  if (!cluster.empty() && !valid_label(cluster))
    return json_error(400, "cluster must be 1-63 of [a-z0-9-._]", "cluster");

  Registration reg;
  reg.key_hash = auth_key.empty() ? "" : hash_join_key(auth_key);
  reg.name = name;
  reg.cluster = cluster;
  reg.public_key = public_key;
  reg.agent_id = sha256_hex(public_key).substr(0, 16);
  // Proof of possession first: the CSR must be signed by the key being registered.
  if (auto proof = SigningCa::verify_csr(csr, public_key); !proof)
    return json_error(400, proof.error(), "csr");
  auto outcome = store_->register_agent(reg, pool_, now_ms());
  if (!outcome.agent) {
    spdlog::warn("control: registration of '{}' refused: {}", name, outcome.error);
    return json_error(outcome.status, outcome.error, outcome.status == 401 ? "auth_key" : "");
  }
  const AgentRecord& a = *outcome.agent;
  auto body = agent_json(a, pool_, ca_.trust_domain());
  auto cert =
      ca_.sign(csr, std::string(body["spiffe_id"].as_string()), options_.node_cert_ttl, public_key);
  if (!cert) return json_error(500, cert.error());
  body["certificate"] = *cert;
  body["ca_bundle"] = ca_.bundle_pem();
  body["certificate_ttl_s"] =
      std::chrono::duration_cast<std::chrono::seconds>(options_.node_cert_ttl).count();
  spdlog::info("control: registered agent {} '{}' cluster '{}' mesh ip {}", a.id, a.name, a.cluster,
               pool_.agent_ip(a.block));
  return {200, json::serialize(body) + "\n"};
}

HttpResponse ControlServer::handle_heartbeat(const HttpRequest& r) {
  // The node certificate is the credential: spiffe://<td>/cluster/<c>/node/<id>.
  const std::string prefix = "spiffe://" + ca_.trust_domain() + "/cluster/";
  const auto node = r.peer_spiffe_id.rfind("/node/");
  if (r.peer_spiffe_id.rfind(prefix, 0) != 0 || node == std::string::npos)
    return json_error(401, "heartbeats need the node's client certificate (mTLS)");
  const std::string id = r.peer_spiffe_id.substr(node + 6);
  if (!store_->touch_agent(id, now_ms()))
    return json_error(404, "unknown agent " + id + "; register again");
  return {200, json::serialize(
                   json::object{{"id", id}, {"interval_ms", options_.heartbeat_interval.count()}}) +
                   "\n"};
}

HttpResponse ControlServer::handle_agents() {
  json::array out;
  // Three missed heartbeats and an agent is unhealthy, and out of routing for everyone else.
  const int64_t healthy_after = now_ms() - 3 * options_.heartbeat_interval.count();
  for (const auto& a : store_->list_agents())
    out.push_back(agent_json(a, pool_, ca_.trust_domain(), healthy_after));
  return {200, json::serialize(json::object{{"agents", out}}) + "\n"};
}

HttpResponse ControlServer::handle_create_key(const HttpRequest& r) {
  auto f = JsonFields::parse(r.body.empty() ? "{}" : r.body, {"ttl", "reusable", "cluster"});
  if (!f) return json_error(400, f.error());
  auto ttl_text = f->string("ttl");
  if (!ttl_text) return json_error(400, ttl_text.error(), "ttl");
  auto ttl = parse_duration(ttl_text->value_or("1h"));
  if (!ttl) return json_error(400, ttl.error(), "ttl");
  auto reusable = f->boolean("reusable");
  if (!reusable) return json_error(400, reusable.error(), "reusable");
  auto cluster = f->string("cluster");
  if (!cluster) return json_error(400, cluster.error(), "cluster");
  auto k = create_join_key(*store_, *ttl, reusable->value_or(false), cluster->value_or(""));
  return {200, json::serialize(json::object{{"id", k.record.id},
                                            {"key", k.secret},
                                            {"reusable", k.record.reusable},
                                            {"cluster", k.record.cluster},
                                            {"expires_at_ms", k.record.expires_at}}) +
                   "\n"};
}

}  // namespace weft
