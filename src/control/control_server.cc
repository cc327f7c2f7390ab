#include "control/control_server.h"

#include "identity/digest.h"
#include "identity/spiffe_id.h"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <boost/asio/ssl.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <csignal>
#include <fstream>
#include <sstream>

#include "control/join_keys.h"
#include "core/label.h"
#include "http/http_client.h"
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
                                                    const std::filesystem::path& dir,
                                                    const HostPort& listen) {
  auto keys = generate_ed25519();
  auto csr = make_csr(keys.private_pem, "weft control");
  // Besides its SPIFFE ID, names an operator's curl can verify (curl --cacert ca.crt).
  std::string sans = ",DNS:localhost,IP:127.0.0.1";
  if (listen.host != "0.0.0.0" && listen.host != "127.0.0.1" && listen.host != "::") {
    boost::system::error_code ec;
    boost::asio::ip::make_address(listen.host, ec);
    sans += (ec ? ",DNS:" : ",IP:") + listen.host;
  }
  auto cert = ca.sign(*csr, "spiffe://" + ca.trust_domain() + "/ns/weft-system/sa/control",
                      std::chrono::hours(24 * 30), {}, sans);
  if (!cert) throw std::runtime_error("cannot issue control's certificate: " + cert.error());
  std::filesystem::create_directories(dir);
  write_file_atomic(dir / "control.key", keys.private_pem, 0600);
  write_file_atomic(dir / "control.crt", *cert + ca.bundle_pem(), 0644);
  write_file_atomic(dir / "ca.crt", ca.bundle_pem(), 0644);
  auto ctx = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
  // A thousand agents park a watch each: an idle connection should not hold 34 KiB of TLS
  // record buffers.
  SSL_CTX_set_mode(ctx->native_handle(), SSL_MODE_RELEASE_BUFFERS);
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

bool is_registry_kind(const std::string& kind) {
  for (const char* k : kRegistryKinds)
    if (kind == k) return true;
  return false;
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

ControlServer::ControlServer(ControlOptions options)
    : options_(std::move(options)), signals_(io_), health_timer_(io_) {
  auto pool = parse_mesh_pool(options_.mesh_cidr);
  if (!pool) throw std::runtime_error(pool.error());
  pool_ = *pool;
  auto ca = load_ca(options_.ca_dir);
  if (!ca) throw std::runtime_error(ca.error());
  ca_ = *ca;
  store_ = open_sqlite_store(options_.data_dir, &pool_);
  admin_token_ = load_or_create_admin_token(options_.data_dir);
  {
    // The secret every pair key derives from; made once, kept with the data (0600). A second
    // line is the secret before the last rotation: its keys still verify.
    const auto path = options_.data_dir / "hmac.secret";
    std::ifstream in(path);
    if (!(in && std::getline(in, hmac_master_) && hmac_master_.size() >= 32)) {
      hmac_master_ = random_hex(32);
      write_file_atomic(path, hmac_master_ + "\n", 0600);
    } else if (!std::getline(in, hmac_previous_) || hmac_previous_.size() < 32) {
      hmac_previous_.clear();
    } else if (std::string when; std::getline(in, when)) {
      hmac_rotated_at_ = std::strtoll(when.c_str(), nullptr, 10);
    }
  }
  registry_ = Registry(ca_.trust_domain());
  registry_.log_retention = store_->log_retention = std::max<size_t>(options_.change_log_size, 1);
  registry_.load(store_->list_objects(), store_->changes_since(0), store_->revision());
  // Every agent gets a fresh grace period at start: control being down is not their fault.
  for (const auto& a : registry_.list("agents")) {
    const std::string id(a.at("id").as_string());
    last_seen_[id] = now_ms();
    if (auto* api = a.if_contains("api"); api && api->is_string() && !api->as_string().empty())
      probe_targets_[id] = std::string(api->as_string());
  }
  std::shared_ptr<boost::asio::ssl::context> tls;
  if (options_.insecure_http) {
    spdlog::warn(
        "*** --insecure-http: the control API is PLAIN HTTP. Join keys and certificates cross the "
        "network unencrypted. For local development only. ***");
  } else {
    tls = make_tls(ca_, options_.data_dir / "tls", options_.listen);
  }
  auto http = HttpServer::bind_async(
      io_, options_.listen, tls,
      [this](const HttpRequest& r, HttpServer::Reply reply) { dispatch(r, std::move(reply)); });
  if (!http) throw std::runtime_error("control API: " + http.error());
  http_ = std::move(*http);
  const std::string bound = HostPort{options_.listen.host, http_->port()}.to_string();
  std::string stun_text = "off";
  if (options_.stun_listen) {
    auto stun = StunServer::bind(io_, *options_.stun_listen);
    if (!stun) throw std::runtime_error(stun.error() + " (set --stun-listen, or 'off')");
    stun_ = std::move(*stun);
    stun_text = "UDP " + options_.stun_listen->host + ":" + std::to_string(stun_->port()) + "+" +
                std::to_string(stun_->alternate_port());
    // Tests and tools find the STUN ports beside the API's.
    if (!options_.address_file.empty())
      write_file_atomic(options_.address_file.string() + ".stun",
                        HostPort{options_.stun_listen->host, stun_->port()}.to_string() + "\n",
                        0644);
  }
  for (const auto& a : store_->list_agents())
    if (auto key = node_key_from_pem(a.public_key)) member_keys_.insert(*key);
  std::string relay_text = "off";
  if (options_.relay_listen && !tls) {
    spdlog::warn("control: no relay with --insecure-http (the relay is TLS only)");
  } else if (options_.relay_listen) {
    RelayOptions ro;
    ro.listen = *options_.relay_listen;
    auto relay = RelayServer::bind(
        io_, tls, ro, [this](const relay::NodeKey& key) { return member_keys_.count(key) > 0; });
    if (!relay) throw std::runtime_error(relay.error() + " (set --relay-listen, or 'off')");
    relay_ = std::move(*relay);
    relay_text = "TLS " + HostPort{options_.relay_listen->host, relay_->port()}.to_string();
    if (!options_.address_file.empty())
      write_file_atomic(options_.address_file.string() + ".relay",
                        HostPort{options_.relay_listen->host, relay_->port()}.to_string() + "\n",
                        0644);
  }
  if (!options_.address_file.empty()) write_file_atomic(options_.address_file, bound + "\n", 0644);
  spdlog::info(
      "weft control ready on {}://{} trust domain {} mesh pool {} ({} agents registered), STUN {}, "
      "relay {}, data in {}",
      tls ? "https" : "http", bound, ca_.trust_domain(), pool_.cidr(), store_->list_agents().size(),
      stun_text, relay_text, options_.data_dir.string());
  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.async_wait([this](const boost::system::error_code& ec, int) {
    if (ec) return;
    spdlog::info("control: shutting down");
    stopping_ = true;
    http_->close();
    if (stun_) stun_->close();
    if (relay_) relay_->close();
    io_.stop();
  });
  sweep_health();
  prober_ = std::thread([this] { probe_loop(); });
}

ControlServer::~ControlServer() {
  stopping_ = true;
  if (prober_.joinable()) prober_.join();
}

int ControlServer::run() {
  io_.run();
  return 0;
}

std::string ControlServer::node_id(const HttpRequest& r) const {
  // The node certificate is the credential: spiffe://<td>/cluster/<c>/node/<id>.
  const std::string prefix = "spiffe://" + ca_.trust_domain() + "/cluster/";
  const auto node = r.peer_spiffe_id.rfind("/node/");
  if (r.peer_spiffe_id.rfind(prefix, 0) != 0 || node == std::string::npos) return "";
  return r.peer_spiffe_id.substr(node + 6);
}

int64_t ControlServer::commit(const std::string& kind, const std::string& name,
                              const std::string& body) {
  const std::string* old = registry_.body(kind, name);
  const std::string prev = old ? *old : "";
  const int64_t rev =
      body.empty() ? store_->delete_object(kind, name) : store_->put_object(kind, name, body);
  if (rev == 0) return 0;
  registry_.apply(rev, kind, name, body, prev);
  notify_watchers();
  return rev;
}

void ControlServer::notify_watchers() {
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    auto next = std::next(it);
    if (it->stream && it->stream->closed()) {
      it->deadline->cancel();
      watchers_.erase(it);
    } else if (auto delta = registry_.delta(it->agent_id, it->since); !delta.empty()) {
      finish(it, delta);
    }
    it = next;
  }
}

void ControlServer::finish(std::list<Watcher>::iterator it, const WatchDelta& delta) {
  if (it->stream) {
    it->stream->write(json::serialize(delta.to_json()) + "\n");
    it->since = delta.revision;
    return;
  }
  auto reply = std::move(it->reply);
  it->deadline->cancel();
  watchers_.erase(it);
  reply({200, json::serialize(delta.to_json()) + "\n"});
}

void ControlServer::arm_watch_deadline(std::list<Watcher>::iterator it) {
  it->deadline->expires_after(it->interval);
  it->deadline->async_wait(
      [this, it, alive = std::weak_ptr<char>(it->alive)](const boost::system::error_code& ec) {
        // Answered already, or the watcher is gone (a change answered it after this fired).
        if (ec || alive.expired()) return;
        if (it->stream && it->stream->closed()) {
          watchers_.erase(it);
          return;
        }
        // Nothing in scope changed up to now: the client may resume from here.
        WatchDelta nothing;
        nothing.revision = registry_.revision();
        const bool streaming = it->stream != nullptr;
        finish(it, nothing);                    // a long poll is erased here
        if (streaming) arm_watch_deadline(it);  // a stream stays; the heartbeat repeats
      });
}

void ControlServer::handle_watch(const HttpRequest& r, HttpServer::Reply reply) {
  std::string agent = node_id(r);
  if (agent.empty() && is_operator(r)) agent = query_param(r.query, "agent");
  if (agent.empty())
    return reply(json_error(
        401, "a watch needs the node's client certificate (or the operator token and ?agent=ID)"));
  if (!registry_.get("agents", agent)) return reply(json_error(404, "no agent " + agent));
  int64_t since = -1;
  if (const auto s = query_param(r.query, "since"); !s.empty()) {
    try {
      size_t used = 0;
      since = std::stoll(s, &used);
      if (used != s.size() || since < 0) throw std::invalid_argument(s);
    } catch (const std::exception&) {
      return reply(json_error(400, "since must be a revision number", "since"));
    }
  }
  Millis timeout = std::chrono::seconds(30);
  if (const auto t = query_param(r.query, "timeout"); !t.empty()) {
    auto d = parse_duration(t);
    if (!d || *d > std::chrono::minutes(5))
      return reply(json_error(400, "timeout must be a duration up to 5m, like 30s", "timeout"));
    timeout = *d;
  }
  const std::string stream = query_param(r.query, "stream");
  if (!stream.empty() && stream != "true" && stream != "false")
    return reply(json_error(400, "stream must be true or false", "stream"));
  auto delta = since < 0 ? registry_.full_view(agent) : registry_.delta(agent, since);
  if (stream == "true") {
    // One JSON delta per line, the first at once (its revision is where the stream starts);
    // `timeout` becomes the interval of empty deltas that prove the stream alive.
    if (timeout < std::chrono::seconds(1))
      return reply(json_error(400, "a stream's timeout (heartbeat interval) must be at least 1s",
                              "timeout"));
    auto out = r.open_stream(200, "application/x-ndjson");
    if (!out) return;
    if (delta.empty()) delta.revision = registry_.revision();
    out->write(json::serialize(delta.to_json()) + "\n");
    watchers_.push_back({agent, delta.revision, nullptr,
                         std::make_unique<boost::asio::steady_timer>(io_), std::move(out),
                         timeout});
    return arm_watch_deadline(std::prev(watchers_.end()));
  }
  if (!delta.empty() || timeout.count() == 0)
    return reply({200, json::serialize(delta.to_json()) + "\n"});
  watchers_.push_back({agent, since, std::move(reply),
                       std::make_unique<boost::asio::steady_timer>(io_), nullptr, timeout});
  arm_watch_deadline(std::prev(watchers_.end()));
}

void ControlServer::dispatch(const HttpRequest& r, HttpServer::Reply reply) {
  if (r.path == "/v1/watch") {
    if (r.method != "GET") return reply(json_error(405, "use GET"));
    try {
      return handle_watch(r, std::move(reply));
    } catch (const std::exception& e) {
      spdlog::error("control: watch: {}", e.what());
      return reply(json_error(500, "internal error; see the control log"));
    }
  }
  reply(handle(r));
}

void ControlServer::publish_agent(const AgentRecord& a, const AgentReport& report) {
  const std::string& hbone = report.hbone;
  const std::string& api = report.api;
  const int64_t cert_expires_ms = report.cert_expires_ms;
  json::object o{{"id", a.id},
                 {"name", a.name},
                 {"cluster", a.cluster},
                 {"mesh_ip", pool_.agent_ip(a.block)},
                 {"spiffe_id", "spiffe://" + ca_.trust_domain() + "/cluster/" +
                                   (a.cluster.empty() ? "default" : a.cluster) + "/node/" + a.id},
                 {"hbone", hbone},
                 {"api", api},
                 {"healthy", true},
                 {"cert_expires_ms", cert_expires_ms},
                 {"candidates", report.candidates.value_or(json::array{})},
                 {"nat_mapping", report.nat_mapping.empty() ? "unknown" : report.nat_mapping},
                 {"p2p", report.p2p.value_or(false)}};
  // Peers address P2P packets (relay frames, probes) by this key; their QUIC handshake checks
  // that the node certificate carries it.
  if (auto key = node_key_from_pem(a.public_key)) o["node_key"] = node_key_hex(*key);
  if (const auto old = registry_.get("agents", a.id)) {
    if (hbone.empty()) o["hbone"] = old->at("hbone");
    if (api.empty()) o["api"] = old->at("api");
    if (cert_expires_ms == 0) o["cert_expires_ms"] = old->at("cert_expires_ms");
    if (!report.candidates && old->contains("candidates")) o["candidates"] = old->at("candidates");
    if (report.nat_mapping.empty() && old->contains("nat_mapping"))
      o["nat_mapping"] = old->at("nat_mapping");
    if (!report.p2p && old->contains("p2p")) o["p2p"] = old->at("p2p");
    o["healthy"] = old->at("healthy");
    if (*old == o) return;
  }
  commit("agents", a.id, json::serialize(o));
  std::lock_guard lock(probe_mutex_);
  if (const auto& url = o["api"].as_string(); !url.empty()) probe_targets_[a.id] = std::string(url);
}

void ControlServer::sweep_health() {
  const int64_t now = now_ms();
  const int64_t stale = 3 * options_.heartbeat_interval.count();
  for (const auto& a : registry_.list("agents")) {
    const std::string id(a.at("id").as_string());
    auto seen = last_seen_.find(id);
    const bool fresh = seen != last_seen_.end() && now - seen->second <= stale;
    const bool healthy = fresh && probe_failures_[id] < 3;
    if (a.at("healthy").as_bool() == healthy) continue;
    json::object next = a;
    next["healthy"] = healthy;
    spdlog::warn("control: agent {} '{}' is now {}{}", id, std::string(a.at("name").as_string()),
                 healthy ? "healthy" : "UNHEALTHY (out of routing)",
                 healthy  ? ""
                 : !fresh ? ": 3 heartbeats missed"
                          : ": 3 failed probes of its /health");
    commit("agents", id, json::serialize(next));
  }
  health_timer_.expires_after(std::max<Millis>(options_.heartbeat_interval / 2, Millis(100)));
  health_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) sweep_health();
  });
}

// Probes each agent's /health, as the mesh-agent seed's control does, off the io thread so a
// slow agent never stalls the API. Results are posted back.
void ControlServer::probe_loop() {
  while (!stopping_) {
    for (auto waited = Millis(0); waited < options_.heartbeat_interval && !stopping_;
         waited += Millis(50))
      std::this_thread::sleep_for(Millis(50));
    std::map<std::string, std::string> targets;
    {
      std::lock_guard lock(probe_mutex_);
      targets = probe_targets_;
    }
    for (const auto& [id, url] : targets) {
      if (stopping_) return;
      HttpCall call;
      call.url = url + "/health";
      call.timeout = std::chrono::milliseconds(2000);
      call.cancel = &stopping_;
      auto res = http_call(call);
      const bool ok = res && res->status == 200;
      // An agent whose API control never reached sits behind a NAT or binds loopback: its
      // heartbeats alone say whether it lives. Failures count once it answered at least once.
      boost::asio::post(io_, [this, id = id, ok] {
        if (ok) {
          probe_failures_[id] = 0;
          probe_reached_.insert(id);
        } else if (probe_reached_.count(id)) {
          ++probe_failures_[id];
        }
      });
    }
  }
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
    if (r.path == "/metrics") {
      // Prometheus scrapes with the operator token (bearer_token_file in its config).
      if (!is_operator(r)) return json_error(401, "metrics need the operator token");
      std::string out =
          "# HELP weft_control_agents Registered agents.\n"
          "# TYPE weft_control_agents gauge\nweft_control_agents " +
          std::to_string(member_keys_.size()) +
          "\n# HELP weft_control_watchers Parked watches and streams.\n"
          "# TYPE weft_control_watchers gauge\nweft_control_watchers " +
          std::to_string(watchers_.size()) +
          "\n# HELP weft_control_revision Registry revision.\n"
          "# TYPE weft_control_revision gauge\nweft_control_revision " +
          std::to_string(registry_.revision()) + "\n";
      if (stun_)
        out +=
            "# HELP weft_stun_answered_total STUN Binding requests answered.\n"
            "# TYPE weft_stun_answered_total counter\nweft_stun_answered_total " +
            std::to_string(stun_->answered()) +
            "\n# HELP weft_stun_dropped_total Datagrams on the STUN ports that were not "
            "Binding requests.\n# TYPE weft_stun_dropped_total counter\n"
            "weft_stun_dropped_total " +
            std::to_string(stun_->dropped()) + "\n";
      if (relay_) out += relay_->metrics_text();
      return {200, out, "text/plain; version=0.0.4"};
    }
    if (r.path == "/v1/register") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_register(r);
    }
    if (r.path == "/v1/heartbeat") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_heartbeat(r);
    }
    if (r.path == "/v1/certificates") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_workload_certificate(r);
    }
    if (r.path == "/v1/hmac-keys") {
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_hmac_key(r);
    }
    if (r.path == "/v1/hmac-keys/rotate") {
      if (!is_operator(r))
        return json_error(
            401, "missing or wrong bearer token (the operator token is in <data-dir>/admin.token)");
      if (r.method != "POST") return json_error(405, "use POST");
      return rotate_hmac_secret();
    }
    if (r.path.rfind("/v1/", 0) == 0) {
      const std::string rest = r.path.substr(4);
      const auto slash = rest.find('/');
      const std::string kind = rest.substr(0, slash);
      if (is_registry_kind(kind))
        return handle_registry(r, kind, slash == std::string::npos ? "" : rest.substr(slash + 1));
    }
    if (r.path == "/v1/relays/heartbeat") {
      // Standalone relays (they hold the operator token) announce themselves and learn which
      // node keys may use them.
      if (!is_operator(r)) return json_error(401, "relays need the operator token");
      if (r.method != "POST") return json_error(405, "use POST");
      return handle_relay_heartbeat(r);
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

HttpResponse ControlServer::handle_relay_heartbeat(const HttpRequest& r) {
  auto f = JsonFields::parse(r.body, {"address", "version"});
  if (!f) return json_error(400, f.error());
  auto address = f->string("address");
  if (!address) return json_error(400, address.error(), "address");
  auto version = f->integer("version");
  if (!version) return json_error(400, version.error(), "version");
  if (address->has_value()) {
    auto hp = parse_host_port(**address);
    if (!hp) return json_error(400, hp.error(), "address");
    if (hp->host == "0.0.0.0" || hp->host == "::")
      return json_error(400, "address must be one agents can reach, not " + hp->host, "address");
    auto [it, fresh] = live_relays_.try_emplace(hp->to_string(), LiveRelay{*hp, now_ms(), 0});
    it->second.last_seen = now_ms();
    if (fresh) spdlog::info("control: relay {} announced to agents", hp->to_string());
  }
  json::object out{{"version", members_version_}};
  if (version->value_or(-1) != static_cast<int64_t>(members_version_)) {
    json::array keys;
    for (const auto& k : member_keys_) keys.push_back(json::value(node_key_hex(k)));
    out["node_keys"] = std::move(keys);
  }
  return {200, json::serialize(out) + "\n"};
}

std::vector<HostPort> ControlServer::standalone_relays() {
  // A relay that stopped calling in is no longer announced: agents would only keep retrying it.
  const int64_t cutoff = now_ms() - 30000;
  std::erase_if(live_relays_, [&](const auto& kv) {
    if (kv.second.last_seen >= cutoff) return false;
    spdlog::warn("control: relay {} silent for 30 s; no longer announced", kv.first);
    return true;
  });
  std::vector<const LiveRelay*> live;
  for (const auto& [_, r] : live_relays_) live.push_back(&r);
  std::sort(live.begin(), live.end(),
            [](const auto* a, const auto* b) { return a->first_seen < b->first_seen; });
  std::vector<HostPort> out = options_.relays;
  for (const auto* r : live)
    if (std::find(out.begin(), out.end(), r->address) == out.end()) out.push_back(r->address);
  return out;
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
  if (!is_valid_label(name)) return json_error(400, "name must be 1-63 of [a-z0-9-._]", "name");
  if (!cluster.empty() && !is_valid_label(cluster))
    return json_error(400, "cluster must be 1-63 of [a-z0-9-._]", "cluster");

  Registration reg;
  reg.key_hash = auth_key.empty() ? "" : hash_join_key(auth_key);
  reg.name = name;
  reg.cluster = cluster;
  reg.public_key = public_key;
  reg.agent_id = sha256_hex(public_key).substr(0, 16);
  // Proof of possession first: the CSR must be signed by the key being registered.
  auto proof = SigningCa::verify_csr(csr, public_key);
  if (!proof) return json_error(400, proof.error(), "csr");
  auto outcome = store_->register_agent(reg, pool_, now_ms());
  if (!outcome.agent) {
    spdlog::warn("control: registration of '{}' refused: {}", name, outcome.error);
    return json_error(outcome.status, outcome.error, outcome.status == 401 ? "auth_key" : "");
  }
  const AgentRecord& a = *outcome.agent;
  last_seen_[a.id] = now_ms();
  if (auto key = node_key_from_pem(a.public_key); key && member_keys_.insert(*key).second)
    ++members_version_;
  auto body = agent_json(a, pool_, ca_.trust_domain());
  auto cert = ca_.sign(*proof, std::string(body["spiffe_id"].as_string()), options_.node_cert_ttl);
  if (!cert) return json_error(500, cert.error());
  AgentReport fresh;
  fresh.cert_expires_ms = now_ms() + options_.node_cert_ttl.count();
  publish_agent(a, fresh);
  body["certificate"] = *cert;
  body["ca_bundle"] = ca_.bundle_pem();
  body["certificate_ttl_s"] =
      std::chrono::duration_cast<std::chrono::seconds>(options_.node_cert_ttl).count();
  spdlog::info("control: registered agent {} '{}' cluster '{}' mesh ip {}", a.id, a.name, a.cluster,
               pool_.agent_ip(a.block));
  return {200, json::serialize(body) + "\n"};
}

HttpResponse ControlServer::handle_heartbeat(const HttpRequest& r) {
  const std::string id = node_id(r);
  if (id.empty()) return json_error(401, "heartbeats need the node's client certificate (mTLS)");
  // The body (optional) tells where the agent serves: its HBONE inbound and its API.
  std::string bad;
  auto f = JsonFields::parse(r.body.empty() ? "{}" : r.body,
                             {"hbone", "api", "candidates", "nat_mapping", "p2p"}, &bad);
  if (!f) return json_error(400, f.error(), bad);
  auto hbone = f->string("hbone");
  if (!hbone) return json_error(400, hbone.error(), "hbone");
  if (hbone->value_or("").size() && !parse_host_port(**hbone))
    return json_error(400, "hbone must be host:port", "hbone");
  auto api = f->string("api");
  if (!api) return json_error(400, api.error(), "api");
  if (api->value_or("").size() && api->value_or("").rfind("http://", 0) != 0 &&
      api->value_or("").rfind("https://", 0) != 0)
    return json_error(400, "api must be an http:// or https:// URL", "api");
  // Where peers may send UDP (QUIC) to this agent: its local and STUN-learned addresses.
  auto candidates = f->strings("candidates");
  if (!candidates) return json_error(400, candidates.error(), "candidates");
  std::optional<json::array> candidate_list;
  if (*candidates) {
    if ((*candidates)->size() > 16) return json_error(400, "at most 16 candidates", "candidates");
    candidate_list.emplace();
    for (const auto& c : **candidates) {
      if (!parse_host_port(c))
        return json_error(400, "candidate '" + c + "' is not host:port", "candidates");
      candidate_list->push_back(json::value(c));
    }
  }
  auto nat = f->string("nat_mapping");
  if (!nat) return json_error(400, nat.error(), "nat_mapping");
  const std::string mapping = nat->value_or("");
  if (!mapping.empty() && mapping != "endpoint-independent" && mapping != "endpoint-dependent" &&
      mapping != "unknown")
    return json_error(400,
                      "nat_mapping must be endpoint-independent, endpoint-dependent or unknown",
                      "nat_mapping");
  // Whether the agent runs its QUIC endpoint: peers then reach it over P2P (relay or direct).
  auto p2p = f->boolean("p2p");
  if (!p2p) return json_error(400, p2p.error(), "p2p");
  if (!store_->touch_agent(id, now_ms()))
    return json_error(404, "unknown agent " + id + "; register again");
  last_seen_[id] = now_ms();
  if (hbone->value_or("").size() || api->value_or("").size() || candidate_list ||
      !mapping.empty() || *p2p) {
    for (const auto& a : store_->list_agents())
      if (a.id == id)
        publish_agent(a,
                      {hbone->value_or(""), api->value_or(""), candidate_list, mapping, *p2p, 0});
  }
  json::object out{{"id", id}, {"interval_ms", options_.heartbeat_interval.count()}};
  // Agents find control's STUN ports here: same host as the API.
  if (stun_) out["stun"] = {{"port", stun_->port()}, {"alternate_port", stun_->alternate_port()}};
  // The relays, in order of preference: control's own first (no host: the agent uses the one
  // it reaches control by), then standalone `weft relay`s. Agents keep a connection to each.
  json::array relays;
  if (relay_) relays.push_back(json::object{{"port", relay_->port()}});
  for (const auto& r : standalone_relays()) relays.push_back({{"host", r.host}, {"port", r.port}});
  out["relays"] = std::move(relays);
  return {200, json::serialize(out) + "\n"};
}

HttpResponse ControlServer::handle_registry(const HttpRequest& r, const std::string& kind,
                                            const std::string& name) {
  // Operators may change anything; an agent (node certificate) only its own resources and
  // endpoints.
  const bool op = is_operator(r);
  const std::string node = op ? "" : node_id(r);
  const bool agent_owned = kind == "resources" || kind == "endpoints";
  if (!op && (node.empty() || !agent_owned))
    return json_error(
        401, "missing or wrong bearer token (the operator token is in <data-dir>/admin.token)");
  const auto owned_by_caller = [&](const json::object& v) {
    auto* a = v.if_contains("agent_id");
    return op || (a && a->is_string() && a->as_string() == node);
  };
  if (name.find('/') != std::string::npos) return json_error(404, "no such endpoint: " + r.path);
  if (name.empty()) {
    if (r.method == "GET") {
      json::array items;
      for (auto& o : registry_.list(kind))
        if (owned_by_caller(o)) items.push_back(o);
      return {
          200,
          json::serialize(json::object{{kind, items}, {"revision", registry_.revision()}}) + "\n"};
    }
    if (r.method != "POST") return json_error(405, "use GET or POST");
  } else if (r.method == "GET") {
    const auto o = registry_.get(kind, name);
    if (!o || !owned_by_caller(*o)) return json_error(404, "no " + kind + " " + name);
    return {200, json::serialize(*o) + "\n"};
  } else if (r.method == "DELETE") {
    const auto o = registry_.get(kind, name);
    if (!o || !owned_by_caller(*o)) return json_error(404, "no " + kind + " " + name);
    const int64_t rev = commit(kind, name, "");
    return {200, json::serialize(json::object{{"deleted", name}, {"revision", rev}}) + "\n"};
  } else if (r.method != "PUT") {
    return json_error(405, "use GET, PUT or DELETE");
  }
  RegistryError err;
  auto v = registry_.validate(kind, name, r.body, err);
  if (!v) return json_error(err.status, err.message, err.field);
  if (!owned_by_caller(*v))
    return json_error(403, "an agent may only write its own " + kind, "agent_id");
  const std::string key =
      std::string(v->contains("id") ? v->at("id").as_string() : v->at("name").as_string());
  if (const auto existing = registry_.get(kind, key)) {
    if (r.method == "POST") return json_error(409, kind + " " + key + " already exists", "name");
    if (!owned_by_caller(*existing)) return json_error(403, "not yours: " + kind + " " + key);
  }
  const int64_t rev = commit(kind, key, json::serialize(*v));
  json::object out = *v;
  out["revision"] = rev;
  return {r.method == "POST" ? 201 : 200, json::serialize(out) + "\n"};
}

HttpResponse ControlServer::handle_workload_certificate(const HttpRequest& r) {
  // The node-agent model (ztunnel): a node obtains certificates only for workloads it hosts.
  const std::string node = node_id(r);
  if (node.empty()) return json_error(401, "workload certificates need the node's certificate");
  std::string bad;
  auto f = JsonFields::parse(r.body, {"namespace", "service_account", "csr"}, &bad);
  if (!f) return json_error(400, f.error(), bad);
  std::string values[3];
  const char* names[3] = {"namespace", "service_account", "csr"};
  for (int i = 0; i < 3; ++i) {
    auto v = f->string(names[i]);
    if (!v) return json_error(400, v.error(), names[i]);
    if (!*v || (*v)->empty())
      return json_error(400, std::string(names[i]) + " is required", names[i]);
    values[i] = **v;
  }
  const auto& [ns, sa, csr] = values;
  if (!registry_.hosts_identity(node, ns, sa)) {
    spdlog::warn("control: agent {} asked for ns/{}/sa/{}, which it does not host: refused", node,
                 ns, sa);
    return json_error(403,
                      "agent " + node + " hosts no workload with namespace " + ns +
                          " and service account " + sa + "; register its endpoint first",
                      "service_account");
  }
  const std::string id = "spiffe://" + ca_.trust_domain() + "/ns/" + ns + "/sa/" + sa;
  auto cert = ca_.sign(csr, id, options_.workload_cert_ttl);
  if (!cert) return json_error(400, cert.error(), "csr");
  return {
      200,
      json::serialize(json::object{
          {"spiffe_id", id},
          {"certificate", *cert},
          {"ca_bundle", ca_.bundle_pem()},
          {"certificate_ttl_s",
           std::chrono::duration_cast<std::chrono::seconds>(options_.workload_cert_ttl).count()}}) +
          "\n"};
}

HttpResponse ControlServer::handle_hmac_key(const HttpRequest& r) {
  // Like certificates: a node gets the key of a pair only if it hosts one end of it, so a
  // node can neither sign as nor verify for workloads it does not run.
  const std::string node = node_id(r);
  if (node.empty()) return json_error(401, "HMAC keys need the node's certificate");
  std::string bad;
  auto f = JsonFields::parse(r.body, {"source", "destination"}, &bad);
  if (!f) return json_error(400, f.error(), bad);
  SpiffeId ids[2];
  const char* names[2] = {"source", "destination"};
  for (int i = 0; i < 2; ++i) {
    auto v = f->string(names[i]);
    if (!v) return json_error(400, v.error(), names[i]);
    if (!*v) return json_error(400, std::string(names[i]) + " is required", names[i]);
    auto id = parse_spiffe_id(**v);
    if (!id) return json_error(400, id.error(), names[i]);
    if (id->trust_domain != ca_.trust_domain())
      return json_error(
          400, std::string(names[i]) + " is not of trust domain " + ca_.trust_domain(), names[i]);
    ids[i] = *id;
  }
  if (!registry_.hosts_identity(node, ids[0].ns, ids[0].service_account) &&
      !registry_.hosts_identity(node, ids[1].ns, ids[1].service_account))
    return json_error(403,
                      "agent " + node + " hosts neither " + ids[0].to_string() + " nor " +
                          ids[1].to_string() + "; register its endpoint first",
                      "source");
  const std::string label = "weft-hmac-pair-v1\n" + ids[0].to_string() + "\n" + ids[1].to_string();
  json::object out{{"source", ids[0].to_string()},
                   {"destination", ids[1].to_string()},
                   {"key", hmac_sha256_hex(hmac_master_, label)}};
  // Until the next rotation, what was signed with the key before this one still verifies; and
  // for a grace after the rotation signers keep using it, until every verifier has the new one.
  if (!hmac_previous_.empty()) {
    out["previous_key"] = hmac_sha256_hex(hmac_previous_, label);
    const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const int64_t grace =
        std::chrono::duration_cast<std::chrono::seconds>(options_.hmac_rotation_grace).count();
    out["sign_with_previous"] = now < hmac_rotated_at_ + grace;
  }
  return {200, json::serialize(out) + "\n"};
}

HttpResponse ControlServer::rotate_hmac_secret() {
  // Every pair key changes; proxies pick the new ones up within their refresh interval and
  // verify the previous ones meanwhile, so no signed request is refused on the way.
  std::string next = random_hex(32);
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  try {
    write_file_atomic(options_.data_dir / "hmac.secret",
                      next + "\n" + hmac_master_ + "\n" + std::to_string(now) + "\n", 0600);
  } catch (const std::exception& e) {
    return json_error(500, std::string("cannot store the new HMAC secret: ") + e.what());
  }
  hmac_previous_ = std::exchange(hmac_master_, std::move(next));
  hmac_rotated_at_ = now;
  spdlog::info(
      "control: HMAC secret rotated; keys of the previous one still verify until the "
      "next rotation");
  return {200, json::serialize(json::object{
                   {"rotated", true},
                   {"signers_switch_after_s",
                    std::chrono::duration_cast<std::chrono::seconds>(options_.hmac_rotation_grace)
                        .count()}}) +
                   "\n"};
}

HttpResponse ControlServer::handle_agents() {
  json::array out;
  // Three missed heartbeats and an agent is unhealthy, and out of routing for everyone else.
  const int64_t healthy_after = now_ms() - 3 * options_.heartbeat_interval.count();
  for (const auto& a : store_->list_agents()) {
    auto o = agent_json(a, pool_, ca_.trust_domain(), healthy_after);
    if (const auto rec = registry_.get("agents", a.id)) {
      o["healthy"] = rec->at("healthy");
      o["hbone"] = rec->at("hbone");
      o["api"] = rec->at("api");
      o["cert_expires_ms"] = rec->at("cert_expires_ms");
      if (rec->contains("candidates")) o["candidates"] = rec->at("candidates");
      if (rec->contains("nat_mapping")) o["nat_mapping"] = rec->at("nat_mapping");
    }
    out.push_back(std::move(o));
  }
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
