#include "proxy/proxy_server.h"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <boost/json.hpp>
#include <csignal>
#include <fstream>
#include <thread>

#include "identity/certificate_authority.h"
#include "proxy/http/cluster_metrics.h"
#include "proxy/sds_client.h"

namespace weft {

namespace asio = boost::asio;
namespace json = boost::json;

namespace {

std::string file_fingerprint(const IdentityConfig& id) {
  std::string out;
  for (const auto* p : {&id.cert, &id.key, &id.ca}) {
    struct stat st {};
    if (::stat(p->c_str(), &st) == 0)
      out += std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + ":" +
             std::to_string(st.st_size) + ";";
    else
      out += "missing;";
  }
  return out;
}

// Each proxied connection needs two descriptors; the default soft limit of 1024 would cap a
// proxy at a few hundred connections.
void raise_fd_limit() {
  // As root we may also raise the hard limit; otherwise take the soft limit up to the hard one.
  struct rlimit big {
    1u << 20, 1u << 20
  };
  if (::setrlimit(RLIMIT_NOFILE, &big) == 0) return;
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

bool uses_agent_hmac_keys(const ProxyConfig& config) {
  for (const auto& s : config.services)
    if (s.http.hmac.from_agent) return true;
  for (const auto& t : config.inbound.targets)
    for (const auto& k : t.hmac.keys)
      if (k.from_agent) return true;
  return false;
}

}  // namespace

ProxyServer::ProxyServer(ProxyOptions options)
    : options_(std::move(options)), signals_(io_), cert_timer_(io_), drain_timer_(io_) {
  raise_fd_limit();
  auto config = std::make_shared<const ProxyConfig>(load_proxy_config(options_.config_file));
  access_log_ = std::make_unique<AccessLog>(config->access_log);
  std::shared_ptr<const TlsContexts> tls;
  if (config->needs_identity()) tls = load_identity(*config);
  config = with_hmac_keys(config, tls ? tls->spiffe_id : "");
  if (uses_agent_hmac_keys(*config))
    spdlog::info("HMAC request-signing keys fetched from the agent");
  file_config_ = config;
  hmac_base_ = config;
  hmac_local_id_ = tls ? tls->spiffe_id : "";
  if (uses_agent_hmac_keys(*config)) hmac_thread_ = std::thread([this] { hmac_refresh_loop(); });
  if (config->services_from_agent) {
    // The certificate came through, so the agent is there; its services complete the config.
    if (auto got = fetch_sds_services(config->identity, "", std::chrono::seconds(5))) {
      agent_services_ = std::move(got->services);
      agent_services_revision_ = got->revision;
    } else {
      spdlog::warn("SDS: {}; starting without the agent's services", got.error());
    }
    config = with_agent_services(config);
    services_thread_ =
        std::thread([this] { sds_loop("services", [this] { return sds_services_step(); }); });
  }
  current_ = std::make_shared<const ProxySnapshot>(ProxySnapshot{config, tls, nullptr});

  const unsigned n =
      config->workers ? config->workers : std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 0; i < n; ++i)
    workers_.push_back(std::make_unique<Worker>(i, metrics_, *access_log_));
  auto bound = bind_listeners(*config);

  auto admin = HttpServer::bind(io_, config->admin, nullptr,
                                [this](const HttpRequest& r) { return handle_admin(r); });
  if (!admin)
    throw std::runtime_error("admin: " + admin.error() +
                             " (set admin.listen to a free port, or 127.0.0.1:0)");
  admin_ = std::move(*admin);
  if (!options_.admin_address_path.empty())
    write_file_atomic(options_.admin_address_path,
                      HostPort{config->admin.host, admin_->port()}.to_string() + "\n", 0644);

  for (auto& w : workers_) w->start();
  publish(current_);
  swap_listeners(std::move(bound));

  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.add(SIGHUP);
  signals_.async_wait([this](const boost::system::error_code& ec, int sig) {
    // A small callable that re-arms itself after each signal.
    struct Loop {
      ProxyServer* s;
      void operator()(const boost::system::error_code& ec, int sig) const {
        if (ec) return;
        if (sig == SIGHUP)
          s->reload();
        else
          s->begin_drain(sig == SIGTERM ? "SIGTERM" : "SIGINT");
        s->signals_.async_wait(*this);
      }
    };
    Loop{this}(ec, sig);
  });
  if (config->needs_identity()) check_certificates();

  std::string summary;
  for (const auto& [key, l] : listeners_) summary += " " + key + "=" + std::to_string(l.port);
  spdlog::info("weft proxy ready: {} workers, identity {}, admin 127.0.0.1:{}, listeners:{}", n,
               tls ? tls->spiffe_id : "none", admin_->port(), summary);
}

ProxyServer::~ProxyServer() {
  sds_stop_ = true;
  if (sds_thread_.joinable()) sds_thread_.join();
  if (services_thread_.joinable()) services_thread_.join();
  if (hmac_thread_.joinable()) hmac_thread_.join();
  for (auto& w : workers_) w->stop_and_join();
}

std::shared_ptr<const TlsContexts> ProxyServer::load_identity(const ProxyConfig& config) {
  const auto& id = config.identity;
  if (!id.from_sds()) {
    cert_fingerprint_ = file_fingerprint(id);
    auto loaded = load_tls_contexts(id, ++tls_generation_);
    if (!loaded) throw std::runtime_error(config.source.string() + ": identity: " + loaded.error());
    return *loaded;
  }
  // A sidecar often starts with its agent: wait for the socket a while before giving up.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::string last;
  for (;;) {
    int status = 0;
    auto got = fetch_sds_identity(id, "", std::chrono::seconds(10), nullptr, &status);
    if (got) {
      auto loaded = make_tls_contexts(got->material, id.trust_domain, ++tls_generation_);
      if (!loaded)
        throw std::runtime_error(config.source.string() + ": identity: " + loaded.error());
      {
        std::lock_guard lock(sds_mutex_);
        sds_identity_ = id;
        sds_serial_ = got->serial;
      }
      if (!sds_thread_.joinable())
        sds_thread_ = std::thread(
            [this] { sds_loop("certificate", [this] { return sds_certificate_step(); }); });
      return *loaded;
    }
    // 4xx: the agent refuses (not allowed, or a workload it does not host); waiting won't help.
    if ((status >= 400 && status < 500) || std::chrono::steady_clock::now() >= deadline)
      throw std::runtime_error(config.source.string() + ": identity: " + got.error());
    if (got.error() != last) spdlog::warn("{}; retrying", got.error());
    last = got.error();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the agent is starting
  }
}

void ProxyServer::sds_loop(const char* what, const std::function<Result<bool>()>& step) {
  auto backoff = std::chrono::milliseconds(500);
  std::string last_error;
  while (!sds_stop_) {
    Millis pause{0};
    bool watching = false;
    {
      std::lock_guard lock(sds_mutex_);
      watching = sds_identity_.from_sds();
    }
    if (!watching) {
      pause = std::chrono::milliseconds(200);  // reloaded to files; nothing to watch
    } else if (auto ok = step()) {
      backoff = std::chrono::milliseconds(500);
      last_error.clear();
    } else if (!sds_stop_) {
      // The agent is restarting or control is away: keep what we have, retry.
      if (ok.error() != last_error)
        spdlog::warn("SDS: {}; keeping the current {}", ok.error(), what);
      last_error = ok.error();
      pause = backoff;
      backoff = std::min<Millis>(backoff * 2, std::chrono::seconds(15));
    }
    for (auto waited = Millis{0}; waited < pause && !sds_stop_;
         waited += std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

Result<bool> ProxyServer::sds_certificate_step() {
  IdentityConfig id;
  std::string serial;
  {
    std::lock_guard lock(sds_mutex_);
    id = sds_identity_;
    serial = sds_serial_;
  }
  auto got = fetch_sds_identity(id, serial, std::chrono::seconds(60), &sds_stop_);
  if (!got) return make_error(got.error());
  if (got->serial == serial) return true;
  {
    std::lock_guard lock(sds_mutex_);
    if (sds_identity_ == id) sds_serial_ = got->serial;
  }
  asio::post(io_, [this, id, m = std::move(got->material), s = got->serial]() mutable {
    install_sds_identity(id, std::move(m), s);
  });
  return true;
}

Result<bool> ProxyServer::sds_services_step() {
  IdentityConfig id;
  std::string revision;
  {
    std::lock_guard lock(sds_mutex_);
    id = sds_identity_;
    revision = agent_services_revision_;
  }
  auto got = fetch_sds_services(id, revision, std::chrono::seconds(60), &sds_stop_);
  if (!got) return make_error(got.error());
  if (got->revision == revision) return true;
  {
    std::lock_guard lock(sds_mutex_);
    agent_services_revision_ = got->revision;
  }
  asio::post(io_, [this, services = std::move(got->services)]() mutable {
    install_agent_services(std::move(services));
  });
  return true;
}

std::shared_ptr<const ProxyConfig> ProxyServer::with_agent_services(
    std::shared_ptr<const ProxyConfig> file) const {
  if (!file->services_from_agent) return file;
  auto merged = std::make_shared<ProxyConfig>(*file);
  for (const auto& s : agent_services_)
    if (!file->find_service(s.name)) merged->services.push_back(s);  // the file's own win
  return merged;
}

void ProxyServer::install_agent_services(std::vector<ServiceConfig> services) {
  if (draining_) return;
  agent_services_ = std::move(services);
  std::string names;
  for (const auto& s : agent_services_) names += " " + s.name;
  spdlog::info("services from the agent:{}", names.empty() ? " none" : names);
  if (!file_config_->services_from_agent) return;
  publish(std::make_shared<const ProxySnapshot>(
      ProxySnapshot{with_agent_services(file_config_), current_->tls, nullptr}));
}

void ProxyServer::install_sds_identity(const IdentityConfig& id, IdentityMaterial material,
                                       const std::string& serial) {
  if (draining_ || !(current_->config->identity == id)) return;  // reloaded meanwhile
  auto loaded = make_tls_contexts(material, id.trust_domain, tls_generation_ + 1);
  OPENSSL_cleanse(material.key_pem.data(), material.key_pem.size());
  if (!loaded) {
    spdlog::warn("SDS sent a certificate that cannot be used (keeping the current one): {}",
                 loaded.error());
    return;
  }
  ++tls_generation_;
  metrics_.certificate_reloads.inc();
  spdlog::info("certificate rotated through SDS: {} serial {} expires {}", (*loaded)->spiffe_id,
               serial, format_utc((*loaded)->leaf.not_after));
  publish(std::make_shared<const ProxySnapshot>(ProxySnapshot{current_->config, *loaded, nullptr}));
}

int ProxyServer::run() {
  io_.run();
  for (auto& w : workers_) w->stop_and_join();
  return exit_code_;
}

std::map<std::string, std::pair<std::string, HostPort>> ProxyServer::wanted_listeners(
    const ProxyConfig& c) const {
  std::map<std::string, std::pair<std::string, HostPort>> out;
  for (const auto& o : c.outbound) out["outbound/" + o.name] = {o.listen.to_string(), o.listen};
  if (c.inbound.enabled) out["inbound"] = {c.inbound.listen.to_string(), c.inbound.listen};
  for (const auto& l : c.l4) out["l4/" + l.name] = {l.listen.to_string(), l.listen};
  if (c.capture.transparent)
    out["capture/transparent"] = {c.capture.transparent->to_string(), *c.capture.transparent};
  if (c.capture.explicit_proxy)
    out["capture/explicit"] = {c.capture.explicit_proxy->to_string(), *c.capture.explicit_proxy};
  if (c.capture.inbound)
    out["capture/inbound"] = {c.capture.inbound->to_string(), *c.capture.inbound};
  return out;
}

std::map<std::string, ProxyServer::BoundListener> ProxyServer::bind_listeners(
    const ProxyConfig& config) {
  std::map<std::string, BoundListener> next;
  for (const auto& [key, want] : wanted_listeners(config)) {
    const auto& [spec, address] = want;
    if (auto it = listeners_.find(key); it != listeners_.end() && it->second.spec == spec) {
      next[key] = it->second;
      continue;
    }
    BoundListener b;
    b.spec = spec;
    HostPort hp = address;
    for (auto& w : workers_) {
      auto l = Listener::bind(w->io(), key, hp);
      if (!l) {
        for (auto& [k, nb] : next)
          if (!listeners_.count(k) || listeners_[k].per_worker != nb.per_worker)
            for (auto& x : nb.per_worker) x->close();
        for (auto& x : b.per_worker) x->close();
        throw std::runtime_error(config.source.string() + ": " + l.error());
      }
      hp.port = (*l)->port();  // port 0: every worker shares the port the first one got
      b.per_worker.push_back(*l);
    }
    b.port = hp.port;
    next[key] = std::move(b);
  }
  return next;
}

void ProxyServer::swap_listeners(std::map<std::string, BoundListener> next) {
  for (const auto& [key, old] : listeners_) {
    auto it = next.find(key);
    if (it == next.end() || it->second.per_worker != old.per_worker)
      for (auto& w : workers_) w->post_close_listener(key);
  }
  for (const auto& [key, b] : next) {
    auto it = listeners_.find(key);
    if (it != listeners_.end() && it->second.per_worker == b.per_worker) continue;
    for (size_t i = 0; i < workers_.size(); ++i) workers_[i]->post_listener(key, b.per_worker[i]);
  }
  listeners_ = std::move(next);
}

// HMAC keys marked from_agent are asked of the agent's SDS socket (control derives them and
// gives them only to a node hosting one end of the pair). Fails like a bad config file.
std::shared_ptr<const ProxyConfig> ProxyServer::with_hmac_keys(
    std::shared_ptr<const ProxyConfig> config, const std::string& local_id) {
  auto fetch = [&](const std::string& source, const std::string& destination) {
    auto key = fetch_sds_pair_key(config->identity, source, destination);
    if (!key)
      throw ConfigError("HMAC key for " + source + " -> " + destination + ": " + key.error());
    return *key;
  };
  std::shared_ptr<ProxyConfig> copy;
  auto mutable_config = [&]() -> ProxyConfig& {
    if (!copy) copy = std::make_shared<ProxyConfig>(*config);
    return *copy;
  };
  for (size_t i = 0; i < config->services.size(); ++i) {
    const auto& s = config->services[i];
    if (s.http.hmac.from_agent)
      mutable_config().services[i].http.hmac.key =
          fetch(local_id, s.spiffe_ids.front()).signing_key();
  }
  for (size_t i = 0; i < config->inbound.targets.size(); ++i) {
    const auto& keys = config->inbound.targets[i].hmac.keys;
    if (std::none_of(keys.begin(), keys.end(), [](const auto& k) { return k.from_agent; }))
      continue;
    // Rebuilt from the configured keys (a previous key added by the last fetch is dropped and
    // fetched again), so re-keying a keyed config is the same as keying the file's.
    std::vector<HmacVerifyConfig::Key> next;
    for (const auto& key : keys) {
      if (key.previous) continue;
      if (!key.from_agent) {
        next.push_back(key);
        continue;
      }
      const auto got = fetch(key.source, local_id);
      next.push_back({key.source, got.key, true, false});
      if (!got.previous.empty()) next.push_back({key.source, got.previous, true, true});
    }
    mutable_config().inbound.targets[i].hmac.keys = std::move(next);
  }
  return copy ? copy : config;
}

namespace {
bool same_hmac_keys(const ProxyConfig& a, const ProxyConfig& b) {
  if (a.services.size() != b.services.size() ||
      a.inbound.targets.size() != b.inbound.targets.size())
    return false;
  for (size_t i = 0; i < a.services.size(); ++i)
    if (a.services[i].http.hmac.key != b.services[i].http.hmac.key) return false;
  for (size_t i = 0; i < a.inbound.targets.size(); ++i) {
    const auto &x = a.inbound.targets[i].hmac.keys, &y = b.inbound.targets[i].hmac.keys;
    if (x.size() != y.size()) return false;
    for (size_t k = 0; k < x.size(); ++k)
      if (x[k].key != y[k].key || x[k].source != y[k].source) return false;
  }
  return true;
}
}  // namespace

// Control may rotate its HMAC secret (POST /v1/hmac-keys/rotate): the keys are fetched again
// every --hmac-refresh, and a change is published like a reload. Verifiers keep the previous
// key beside the new one; signers switch only after control's grace (see SdsPairKey).
void ProxyServer::hmac_refresh_loop() {
  std::string last_error;
  while (!sds_stop_) {
    for (auto waited = Millis{0}; waited < options_.hmac_refresh && !sds_stop_;
         waited += std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (sds_stop_) return;
    std::shared_ptr<const ProxyConfig> base;
    std::string local_id;
    {
      std::lock_guard lock(sds_mutex_);
      base = hmac_base_;
      local_id = hmac_local_id_;
    }
    std::shared_ptr<const ProxyConfig> next;
    try {
      next = with_hmac_keys(base, local_id);
    } catch (const std::exception& e) {
      if (e.what() != last_error) spdlog::warn("HMAC keys: {}; keeping the current ones", e.what());
      last_error = e.what();
      continue;
    }
    last_error.clear();
    if (same_hmac_keys(*next, *base)) continue;
    asio::post(io_, [this, base, next] {
      if (draining_ || file_config_ != base) return;  // reloaded meanwhile: that one counts
      spdlog::info("HMAC keys changed (control rotated its secret); in use now");
      file_config_ = next;
      {
        std::lock_guard lock(sds_mutex_);
        hmac_base_ = next;
      }
      publish(std::make_shared<const ProxySnapshot>(
          ProxySnapshot{with_agent_services(file_config_), current_->tls, nullptr}));
    });
  }
}

void ProxyServer::publish(SnapshotPtr snapshot) {
  if (!snapshot->http) {
    // L7 state (breaker counts, ejections, buckets) carries over; a certificate rotation keeps
    // the very same runtime.
    const HttpRuntime* previous = current_ ? current_->http.get() : nullptr;
    ProxySnapshot s = *snapshot;
    s.http = previous && current_->config == s.config ? current_->http
                                                      : HttpRuntime::build(s.config, previous);
    snapshot = std::make_shared<const ProxySnapshot>(std::move(s));
  }
  current_ = snapshot;
  for (auto& w : workers_) w->post_snapshot(snapshot);
}

void ProxyServer::reload() {
  if (draining_) return;
  spdlog::info("SIGHUP: reloading {}", options_.config_file.string());
  try {
    auto config = std::make_shared<const ProxyConfig>(load_proxy_config(options_.config_file));
    if (config->workers && config->workers != workers_.size())
      spdlog::warn("reload: 'workers' changed to {}; takes effect at the next restart",
                   config->workers);
    auto tls = current_->tls;
    const bool id_changed = !(config->identity == current_->config->identity);
    if (config->needs_identity() && (!tls || id_changed)) tls = load_identity(*config);
    config = with_hmac_keys(config, tls ? tls->spiffe_id : "");
    auto next = bind_listeners(*config);
    file_config_ = config;
    {
      std::lock_guard lock(sds_mutex_);
      hmac_base_ = config;
      hmac_local_id_ = tls ? tls->spiffe_id : "";
    }
    publish(std::make_shared<const ProxySnapshot>(
        ProxySnapshot{with_agent_services(config), tls, nullptr}));
    swap_listeners(std::move(next));
    if (uses_agent_hmac_keys(*config) && !hmac_thread_.joinable())
      hmac_thread_ = std::thread([this] { hmac_refresh_loop(); });
    if (config->services_from_agent && !services_thread_.joinable())
      services_thread_ =
          std::thread([this] { sds_loop("services", [this] { return sds_services_step(); }); });
    metrics_.config_reloads.inc();
    spdlog::info("reload: new config active; established connections were kept");
  } catch (const std::exception& e) {
    metrics_.config_reload_failures.inc();
    spdlog::error("reload refused, the running config stays: {}", e.what());
  }
}

void ProxyServer::check_certificates() {
  const auto& id = current_->config->identity;
  const std::string fp = id.from_sds() ? cert_fingerprint_ : file_fingerprint(id);
  if (fp != cert_fingerprint_ && !draining_) {
    auto loaded = load_tls_contexts(id, tls_generation_ + 1);
    if (loaded) {
      ++tls_generation_;
      cert_fingerprint_ = fp;
      last_cert_error_.clear();
      metrics_.certificate_reloads.inc();
      spdlog::info("certificate rotated: {} serial {} expires {}", (*loaded)->spiffe_id,
                   (*loaded)->leaf.serial_hex, format_utc((*loaded)->leaf.not_after));
      publish(
          std::make_shared<const ProxySnapshot>(ProxySnapshot{current_->config, *loaded, nullptr}));
    } else if (loaded.error() != last_cert_error_) {
      // Often a rotation caught half-written; the next check retries. Keep serving the old one.
      last_cert_error_ = loaded.error();
      spdlog::warn(
          "certificate files changed but cannot be used yet (keeping the current ones): {}",
          loaded.error());
    }
  }
  cert_timer_.expires_after(current_->config->cert_check_interval);
  cert_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) check_certificates();
  });
}

void ProxyServer::begin_drain(const std::string& why) {
  if (draining_) return;
  draining_ = true;
  drain_deadline_ = std::chrono::steady_clock::now() + current_->config->drain_timeout;
  spdlog::info("{}: draining; no new connections, waiting up to {} for {} open", why,
               format_duration(current_->config->drain_timeout),
               metrics_.downstream_connections_active.get());
  for (auto& w : workers_) w->post_drain();
  cert_timer_.cancel();
  sds_stop_ = true;
  watch_drain();
}

void ProxyServer::watch_drain() {
  const auto open = metrics_.downstream_connections_active.get();
  const bool late = std::chrono::steady_clock::now() >= drain_deadline_;
  if (open == 0 || late) {
    if (open)
      spdlog::warn("drain deadline reached; closing {} connections still open", open);
    else
      spdlog::info("drained; exiting");
    signals_.cancel();
    if (admin_) admin_->close();
    io_.stop();
    return;
  }
  drain_timer_.expires_after(std::chrono::milliseconds(50));
  drain_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) watch_drain();
  });
}

bool ProxyServer::ready() const {
  if (draining_ || !current_) return false;
  if (current_->config->needs_identity()) {
    if (!current_->tls) return false;
    if (current_->tls->leaf.not_after < std::time(nullptr)) return false;
  }
  return listeners_.size() == wanted_listeners(*current_->config).size();
}

json::object ProxyServer::certs_json() const {
  json::object o;
  if (!current_->tls) return o;
  const auto& t = *current_->tls;
  const auto now = std::time(nullptr);
  o["identity"] = t.spiffe_id;
  o["trust_domain"] = t.trust_domain;
  o["certificate"] = {{"path", current_->config->identity.cert.string()},
                      {"serial", t.leaf.serial_hex},
                      {"not_before", format_utc(t.leaf.not_before)},
                      {"not_after", format_utc(t.leaf.not_after)},
                      {"seconds_until_expiry", static_cast<int64_t>(t.leaf.not_after - now)}};
  o["ca"] = {{"path", current_->config->identity.ca.string()},
             {"subject", t.ca.subject},
             {"not_after", format_utc(t.ca.not_after)}};
  o["generation"] = t.generation;
  return o;
}

json::object ProxyServer::listeners_json() const {
  json::object o;
  for (const auto& [key, l] : listeners_) {
    const auto& want = wanted_listeners(*current_->config);
    auto it = want.find(key);
    std::string host = it == want.end() ? "" : it->second.second.host;
    o[key] = HostPort{host, l.port}.to_string();
  }
  return o;
}

HttpResponse ProxyServer::handle_admin(const HttpRequest& r) {
  const bool get = r.method == "GET" || r.method == "HEAD";
  const auto text = [](int status, std::string body) {
    return HttpResponse{status, std::move(body), "text/plain"};
  };
  const auto json_body = [](const json::value& v) {
    return HttpResponse{200, json::serialize(v), "application/json"};
  };
  if (r.path == "/ready") {
    if (!get) return text(405, "use GET\n");
    const bool ok = ready();
    return text(ok ? 200 : 503, ok ? "LIVE\n" : (draining_ ? "DRAINING\n" : "NOT READY\n"));
  }
  if (r.path == "/healthz") return text(200, "ok\n");
  if (r.path == "/stats") return json_body(metrics_.to_json());
  if (r.path == "/stats/prometheus" || r.path == "/metrics") {
    std::string body = metrics_.prometheus();
    if (current_->http) write_cluster_metrics(*current_->http, steady_now_ms(), body);
    return {200, std::move(body), "text/plain; version=0.0.4; charset=utf-8"};
  }
  if (r.path == "/config_dump")
    return json_body(json::object{{"config", current_->config->to_json()},
                                  {"listeners", listeners_json()},
                                  {"workers", workers_.size()}});
  if (r.path == "/certs") return json_body(certs_json());
  if (r.path == "/listeners") return json_body(listeners_json());
  if (r.path == "/drain" || r.path == "/quitquitquit") {
    if (r.method != "POST") return text(405, "use POST\n");
    // Answer first; drain starts right after this handler returns.
    asio::post(io_, [this, quit = r.path == "/quitquitquit"] {
      begin_drain(quit ? "POST /quitquitquit" : "POST /drain");
      if (quit) {
        drain_deadline_ = std::chrono::steady_clock::now();
        watch_drain();
      }
    });
    return text(200, "OK\n");
  }
  return text(
      404,
      "unknown path; try /ready /healthz /stats /stats/prometheus /metrics /config_dump /certs "
      "/listeners, POST /drain, POST /quitquitquit\n");
}

}  // namespace weft
