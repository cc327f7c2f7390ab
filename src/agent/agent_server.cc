#include "agent/agent_server.h"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>
#include <csignal>
#include <fstream>
#include <future>
#include <random>
#include <set>
#include <sstream>

#include "control/join_keys.h"
#include "http/http_client.h"
#include "identity/certificate_authority.h"
#include "identity/certificate_info.h"
#include "identity/csr.h"
#include "identity/ed25519_pem.h"
#include "identity/spiffe_id.h"
#include "p2p/relay_server.h"
#include "proxy/l4/splice_relay.h"

namespace weft {

namespace fs = std::filesystem;
namespace json = boost::json;
using tcp = boost::asio::ip::tcp;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The raw 32-byte Ed25519 public key, base64 — the seed's public_key field.
std::string raw_public_b64(const std::string& pem) {
  auto key = ed25519_public_from_pem(pem);
  if (!key) return "";
  unsigned char out[64];
  const int n = EVP_EncodeBlock(out, key->data(), static_cast<int>(key->size()));
  return std::string(reinterpret_cast<char*>(out), static_cast<size_t>(n));
}

std::string utc_now() { return format_utc(std::time(nullptr)); }

}  // namespace

AgentServer::AgentServer(AgentOptions options)
    : options_(std::move(options)), signals_(io_), access_log_(options_.access_log) {
  std::error_code ec;
  // Absolute, because the data plane's config names files in it.
  options_.state_dir = fs::absolute(options_.state_dir);
  fs::create_directories(options_.state_dir, ec);
  if (ec)
    throw std::runtime_error("cannot create state dir " + options_.state_dir.string() + ": " +
                             ec.message());
  ::chmod(options_.state_dir.c_str(), 0700);

  // Identity: generated once, kept 0600, never printed or served.
  const fs::path key_file = options_.state_dir / "node.key";
  if (!fs::exists(key_file)) {
    auto kp = generate_ed25519();
    write_file_atomic(key_file, kp.private_pem, 0600);
    write_file_atomic(options_.state_dir / "node.pub", kp.public_pem, 0644);
    spdlog::info("agent: generated a new Ed25519 node key in {}", key_file.string());
  }
  public_key_pem_ = slurp(options_.state_dir / "node.pub");
  public_key_b64_ = raw_public_b64(public_key_pem_);
  id_ = sha256_hex(public_key_pem_).substr(0, 16);  // control derives the same ID

  if (fs::exists(options_.state_dir / "agent.json")) {
    boost::system::error_code jec;
    const auto v = json::parse(slurp(options_.state_dir / "agent.json"), jec);
    if (jec || !v.is_object())
      throw std::runtime_error((options_.state_dir / "agent.json").string() +
                               " is damaged; move it away to start fresh");
    const auto& o = v.as_object();
    const auto text = [&](const char* k) {
      auto* p = o.if_contains(k);
      return p && p->is_string() ? std::string(p->as_string()) : std::string();
    };
    assigned_ip_ = text("assigned_ip");
    spiffe_id_ = text("spiffe_id");
    registered_at_ = text("registered_at");
    if (auto* b = o.if_contains("mesh_blocks"); b && b->is_array())
      for (const auto& x : b->as_array())
        if (x.is_string()) mesh_blocks_.emplace_back(x.as_string());
    if (options_.name.empty()) options_.name = text("name");
    if (options_.cluster_id.empty()) options_.cluster_id = text("cluster_id");
  }
  if (options_.name.empty()) {
    char host[256] = "node";
    ::gethostname(host, sizeof host);
    options_.name = host;
    for (auto& c : options_.name)
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }

  if (options_.api_token.empty()) {
    const fs::path token_file = options_.state_dir / "api.token";
    if (fs::exists(token_file)) {
      options_.api_token = slurp(token_file);
      while (!options_.api_token.empty() && options_.api_token.back() == '\n')
        options_.api_token.pop_back();
    } else {
      options_.api_token = "wapi_" + random_hex(24);
      write_file_atomic(token_file, options_.api_token + "\n", 0600);
    }
  }

  // Resources: the persisted set, plus --proxies rules not already in it.
  if (fs::exists(options_.state_dir / "resources.json")) {
    const json::value saved = json::parse(slurp(options_.state_dir / "resources.json"));
    for (const auto& v : saved.as_array()) {
      FieldError fe;
      auto r = decode_resource(json::serialize(v), fe);
      if (!r)
        throw std::runtime_error((options_.state_dir / "resources.json").string() + ": " +
                                 r.error());
      proxies_[r->id] = Proxy{*r, nullptr, ""};
    }
  }
  for (const auto& r : options_.proxies)
    if (!proxies_.count(r.id)) proxies_[r.id] = Proxy{r, nullptr, ""};
  for (auto& [id, p] : proxies_) {
    p.resource.agent_id = id_;
    if (p.resource.enabled) {
      if (auto err = open_proxy(p); !err.empty())
        throw std::runtime_error("resource " + id + ": " + err);
    }
  }
  save_resources();
  save_agent();

  auto api = HttpServer::bind(io_, HostPort{options_.api_address, options_.api_port}, nullptr,
                              [this](const HttpRequest& r) { return handle(r); });
  if (!api) throw std::runtime_error("agent API: " + api.error());
  api_ = std::move(*api);
  api_port_ = api_->port();
  const std::string bound = HostPort{options_.api_address, api_->port()}.to_string();
  advertise_address_ = options_.advertise_address;
  if (advertise_address_.empty()) {
    const std::string& host = options_.hbone_listen.host;
    advertise_address_ = host == "0.0.0.0" || host == "::" ? "127.0.0.1" : host;
    if (!options_.control_url.empty() && advertise_address_ != host)
      spdlog::warn(
          "agent: HBONE listens on {} and --advertise-address is not set: other agents are told "
          "{}, which only works on this machine",
          options_.hbone_listen.to_string(), advertise_address_);
  }
  view_ = MeshView::load(options_.state_dir / "view.json");
  dataplane_ = std::make_unique<DataPlane>(io_, options_.state_dir);
  if (!options_.control_url.empty() && options_.p2p != "off") start_p2p();
  if (!options_.address_file.empty()) write_file_atomic(options_.address_file, bound + "\n", 0644);

  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.async_wait([this](const boost::system::error_code& ec, int) {
    if (ec) return;
    stopping_ = true;
    sync_cv_.notify_all();
    api_->close();
    for (auto& [id, p] : proxies_) close_proxy(p);
    dataplane_->stop();
    sds_.reset();
    if (relay_) relay_->stop();
    gateways_.clear();
    p2p_imports_.reset();
    p2p_.reset();
    io_.stop();
  });
  if (!options_.control_url.empty()) {
    start_sds();
    control_state_ = "registering";
    // With a certificate from before, serve the last config at once; control may be away.
    if (fs::exists(options_.state_dir / "node.crt") && view_.revision() >= 0) rebuild_dataplane();
    registrar_ = std::thread([this] { register_loop(); });
    watcher_ = std::thread([this] { watch_loop(); });
  }
  spdlog::info("weft agent {} '{}' ready: API http://{} ({} resources), control {}", id_,
               options_.name, bound, proxies_.size(),
               options_.control_url.empty() ? "none" : options_.control_url);
}

AgentServer::~AgentServer() {
  stopping_ = true;
  sync_cv_.notify_all();
  sds_.reset();
  if (registrar_.joinable()) registrar_.join();
  if (watcher_.joinable()) watcher_.join();
}

int AgentServer::run() {
  io_.run();
  return 0;
}

void AgentServer::start_sds() {
  if (options_.sds_socket == "off") return;
  const fs::path socket =
      options_.sds_socket.empty() ? options_.state_dir / "sds.sock" : options_.sds_socket;
  auto sds = SdsServer::start(
      io_, {socket, options_.sds_allow_uids},
      [this](const std::string& ns, const std::string& sa, const std::string& csr) {
        return sign_workload(ns, sa, csr);
      },
      [this](const std::string& source, const std::string& destination) {
        return fetch_pair_key(source, destination);
      });
  if (!sds) {
    // A default path can be too long for a Unix socket (108 bytes); say so, serve the rest.
    if (!options_.sds_socket.empty()) throw std::runtime_error("--sds-socket: " + sds.error());
    spdlog::warn("agent: no SDS socket for sidecars: {} (set --sds-socket)", sds.error());
    return;
  }
  sds_ = std::move(*sds);
  spdlog::info("agent: SDS for sidecars on unix:{}", socket.string());
}

SignedWorkload AgentServer::sign_workload(const std::string& ns, const std::string& sa,
                                          const std::string& csr_pem) const {
  SignedWorkload out;
  if (!fs::exists(options_.state_dir / "node.crt")) {
    out.status = 503;
    out.error = "the agent has not registered with control yet";
    return out;
  }
  HttpCall call = control_call("/v1/certificates", true);
  call.method = "POST";
  call.body =
      json::serialize(json::object{{"namespace", ns}, {"service_account", sa}, {"csr", csr_pem}});
  call.timeout = std::chrono::seconds(10);
  auto r = http_call(call);
  if (!r) {
    out.error = "control unreachable: " + r.error();
    return out;
  }
  out.status = r->status;
  json::error_code ec;
  auto v = json::parse(r->body, ec);
  try {
    if (ec || !v.is_object()) throw std::runtime_error("control's answer is not JSON");
    if (r->status != 200) {
      out.error = "control: " + json::value_to<std::string>(v.at("error"));
      return out;
    }
    out.spiffe_id = json::value_to<std::string>(v.at("spiffe_id"));
    out.certificate = json::value_to<std::string>(v.at("certificate"));
    out.ca_bundle = json::value_to<std::string>(v.at("ca_bundle"));
  } catch (const std::exception& e) {
    out.status = 502;
    out.error = std::string("control's answer: ") + e.what();
  }
  return out;
}

PairKey AgentServer::fetch_pair_key(const std::string& source, const std::string& destination) {
  PairKey out;
  if (!fs::exists(options_.state_dir / "node.crt")) {
    out.status = 503;
    out.error = "the agent has not registered with control yet";
    return out;
  }
  HttpCall call = control_call("/v1/hmac-keys", true);
  call.method = "POST";
  call.body = json::serialize(json::object{{"source", source}, {"destination", destination}});
  call.timeout = std::chrono::seconds(10);
  auto r = http_call(call);
  if (!r) {
    out.error = "control unreachable: " + r.error();
    return out;
  }
  out.status = r->status;
  json::error_code ec;
  auto v = json::parse(r->body, ec);
  try {
    if (ec || !v.is_object()) throw std::runtime_error("control's answer is not JSON");
    if (r->status != 200) {
      out.error = "control: " + json::value_to<std::string>(v.at("error"));
      return out;
    }
    out.key = json::value_to<std::string>(v.at("key"));
    if (const auto* p = v.as_object().if_contains("previous_key"); p && p->is_string())
      out.previous = std::string(p->as_string());
    if (const auto* s = v.as_object().if_contains("sign_with_previous"); s && s->is_bool())
      out.sign_with_previous = s->as_bool();
  } catch (const std::exception& e) {
    out.status = 502;
    out.error = std::string("control's answer: ") + e.what();
  }
  return out;
}

HttpCall AgentServer::control_call(const std::string& path, bool with_node_cert) const {
  HttpCall call;
  call.url = options_.control_url + path;
  call.ca_file = !options_.control_ca.empty() ? options_.control_ca : options_.state_dir / "ca.crt";
  call.cancel = &stopping_;
  if (with_node_cert) {
    call.cert_file = options_.state_dir / "node.crt";
    call.key_file = options_.state_dir / "node.key";
  }
  return call;
}

bool AgentServer::wait_or_wake(std::chrono::steady_clock::time_point until) {
  std::unique_lock lock(sync_mutex_);
  sync_cv_.wait_until(lock, until, [this] { return stopping_.load() || sync_wanted_; });
  const bool wanted = sync_wanted_;
  sync_wanted_ = false;
  return wanted;
}

Result<json::object> AgentServer::register_once(const std::string& key_pem) {
  auto csr = make_csr(key_pem, options_.name);
  if (!csr) return make_error(csr.error());
  json::object body{{"auth_key", options_.auth_key},
                    {"name", options_.name},
                    {"cluster", options_.cluster_id},
                    {"public_key", public_key_pem_},
                    {"csr", *csr}};
  HttpCall call = control_call("/v1/register", false);
  call.method = "POST";
  call.body = json::serialize(body);
  auto res = http_call(call);
  if (!res) return make_error(res.error());
  if (res->status != 200)
    return make_error("control answered " + std::to_string(res->status) + ": " + res->body);
  boost::system::error_code ec;
  auto v = json::parse(res->body, ec);
  if (ec || !v.is_object()) return make_error("control's registration answer is not JSON");
  return v.as_object();
}

void AgentServer::install_registration(const json::object& v) {
  // The certificate is written before anything uses it; the data plane proxy watches the file
  // and rotates to a renewed one by itself.
  write_file_atomic(options_.state_dir / "ca.crt", json::value_to<std::string>(v.at("ca_bundle")),
                    0644);
  write_file_atomic(options_.state_dir / "node.crt",
                    json::value_to<std::string>(v.at("certificate")), 0644);
  cert_received_ = std::time(nullptr);
  boost::asio::post(io_, [this, v] {
    const bool first = assigned_ip_.empty() || spiffe_id_.empty();
    assigned_ip_ = json::value_to<std::string>(v.at("mesh_ip"));
    mesh_blocks_ = {json::value_to<std::string>(v.at("mesh_block"))};
    spiffe_id_ = json::value_to<std::string>(v.at("spiffe_id"));
    if (registered_at_.empty()) registered_at_ = utc_now();
    for (auto& [id, p] : proxies_) p.resource.mesh_ip = assigned_ip_;
    save_agent();
    save_resources();
    control_state_ = "registered";
    if (first)
      spdlog::info("agent: registered with control as {} (mesh ip {}, {})", id_, assigned_ip_,
                   spiffe_id_);
    load_p2p_tls();
    rebuild_dataplane();
  });
}

void AgentServer::register_loop() {
  std::mt19937 rng(std::random_device{}());
  std::chrono::milliseconds backoff(500);
  const std::string key_pem = slurp(options_.state_dir / "node.key");
  while (!stopping_) {
    auto res = register_once(key_pem);
    if (res) {
      install_registration(*res);
      heartbeat_loop();
      return;
    }
    const std::string why = res.error();
    if (why.rfind("control answered 401", 0) == 0) {
      // A refused key will not start working by retrying; say so and stop.
      boost::asio::post(io_, [this, why] { control_state_ = "registration refused: " + why; });
      spdlog::error(
          "agent: registration refused: {} (create a key with 'weft control keys create')", why);
      return;
    }
    boost::asio::post(io_, [this, why] {
      control_state_ = (assigned_ip_.empty() ? "registering, control unreachable: "
                                             : "serving last config, control unreachable: ") +
                       why;
    });
    spdlog::warn("agent: cannot reach control: {}; retrying in {} ms", why, backoff.count());
    // Backoff with jitter, in small steps so shutdown is prompt.
    const auto wait = backoff + std::chrono::milliseconds(std::uniform_int_distribution<int>(
                                    0, static_cast<int>(backoff.count() / 2))(rng));
    for (auto waited = std::chrono::milliseconds(0); waited < wait && !stopping_;
         waited += std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
  }
}

// Renews the node certificate at 2/3 of its lifetime, by registering again: the CSR proves the
// node key, so no join key is needed and the ID and address stay.
void AgentServer::renew_if_due(const std::string& key_pem) {
  auto info = load_certificate_info(options_.state_dir / "node.crt");
  if (!info) return;
  // Certificates are backdated a minute for clock skew: count the lifetime from when this one
  // arrived, or a short-lived certificate would look two-thirds spent at once.
  const std::time_t start = std::max<std::time_t>(info->not_before, cert_received_.load());
  const std::time_t due = start + (info->not_after - start) * 2 / 3;
  if (std::time(nullptr) < due) return;
  auto res = register_once(key_pem);
  if (!res) {
    spdlog::warn("agent: node certificate renewal failed: {}; it expires {}", res.error(),
                 format_utc(info->not_after));
    return;
  }
  install_registration(*res);
  spdlog::info("agent: node certificate renewed (the old one expired {})",
               format_utc(info->not_after));
}

bool AgentServer::publish_resources() {
  std::map<std::string, std::string> desired;
  {
    std::lock_guard lock(sync_mutex_);
    desired = desired_resources_;
  }
  // What control holds for this agent, so removals made while it was away are caught too.
  HttpCall list = control_call("/v1/resources", true);
  auto listed = http_call(list);
  if (!listed || listed->status != 200) return false;
  boost::system::error_code ec;
  auto v = json::parse(listed->body, ec);
  if (ec || !v.is_object()) return false;
  std::map<std::string, std::string> there;
  for (const auto& r : v.at("resources").as_array())
    there[json::value_to<std::string>(r.at("id"))] = json::serialize(r);
  bool failed = false;
  for (const auto& [id, body] : desired) {
    auto it = there.find(id);
    if (it != there.end() && json::parse(it->second) == json::parse(body)) continue;
    HttpCall put = control_call("/v1/resources/" + id, true);
    put.method = "PUT";
    put.body = body;
    auto r = http_call(put);
    if (!r || r->status >= 300) {
      spdlog::warn("agent: cannot publish resource {}: {}", id,
                   r ? std::to_string(r->status) + " " + r->body : r.error());
      failed = true;
    }
  }
  for (const auto& [id, body] : there) {
    if (desired.count(id)) continue;
    HttpCall del = control_call("/v1/resources/" + id, true);
    del.method = "DELETE";
    auto r = http_call(del);
    failed = failed || !r || r->status >= 300;
  }
  return !failed;
}

void AgentServer::heartbeat_loop() {
  const std::string key_pem = slurp(options_.state_dir / "node.key");
  int failures = 0;
  bool publish_pending = true;
  auto next_beat = std::chrono::steady_clock::now();
  // NAT discovery against control's STUN port (named in heartbeat answers), redone every few
  // minutes: addresses change (DHCP, roaming) and NAT mappings expire.
  std::optional<NatCandidates> nat;
  std::chrono::steady_clock::time_point nat_probed{};
  while (!stopping_) {
    // Wakes early when a resource changed, so control hears of it at once.
    if (wait_or_wake(next_beat)) publish_pending = true;
    if (stopping_) return;
    if (publish_pending) publish_pending = !publish_resources();
    if (std::chrono::steady_clock::now() < next_beat) continue;
    next_beat = std::chrono::steady_clock::now() + options_.heartbeat_interval;
    renew_if_due(key_pem);
    json::object body{{"api", "http://" + HostPort{options_.api_address, api_port_}.to_string()}};
    if (auto port = dataplane_->inbound_port()) {
      hbone_port_ = *port;
      body["hbone"] = HostPort{advertise_address_, *port}.to_string();
    }
    if (p2p_started_) body["p2p"] = true;
    if (nat) {
      json::array c;
      for (const auto& a : nat->candidates) c.push_back(json::value(a));
      body["candidates"] = std::move(c);
      body["nat_mapping"] = nat->mapping;
    }
    HttpCall call = control_call("/v1/heartbeat", true);
    call.method = "POST";
    call.body = json::serialize(body);
    auto res = http_call(call);
    if (res && res->status == 200) {
      if (failures) boost::asio::post(io_, [this] { control_state_ = "registered"; });
      failures = 0;
      const auto now = std::chrono::steady_clock::now();
      {
        json::error_code ec;
        const auto answer = json::parse(res->body, ec);
        const auto* relays =
            !ec && answer.is_object() ? answer.as_object().if_contains("relays") : nullptr;
        const auto url = boost::urls::parse_uri(options_.control_url);
        if (relays && relays->is_array() && url) {
          // Control's own relay comes without a host: it is control's, as this agent reaches it.
          std::vector<HostPort> list;
          for (const auto& r : relays->as_array()) {
            const auto* o = r.if_object();
            const auto* port = o ? o->if_contains("port") : nullptr;
            const auto* host = o ? o->if_contains("host") : nullptr;
            if (!port || !port->is_int64() || port->as_int64() <= 0 || port->as_int64() > 65535)
              continue;
            list.push_back({host && host->is_string() && !host->as_string().empty()
                                ? std::string(host->as_string())
                                : std::string(url->host()),
                            static_cast<uint16_t>(port->as_int64())});
          }
          boost::asio::post(io_, [this, list = std::move(list)] { use_relays(list); });
        }
      }
      if (now - nat_probed > std::chrono::minutes(5) ||
          (!nat && now - nat_probed > std::chrono::seconds(30))) {
        nat_probed = now;
        if (auto found = probe_nat_via_control(res->body)) {
          const bool changed = !nat || nat->candidates != found->candidates;
          nat = std::move(*found);
          std::vector<boost::asio::ip::udp::endpoint> own;
          for (const auto& c : nat->candidates) {
            auto hp = parse_host_port(c);
            boost::system::error_code ec;
            auto ip = hp ? boost::asio::ip::make_address(hp->host, ec) : boost::asio::ip::address();
            if (hp && !ec) own.emplace_back(ip, hp->port);
          }
          boost::asio::post(io_, [this, own = std::move(own)]() mutable {
            if (p2p_) p2p_->set_own_candidates(std::move(own));
          });
          if (changed) next_beat = now;  // tell control at once
        }
      }
      continue;
    }
    const std::string why = res ? "control answered " + std::to_string(res->status) : res.error();
    if (++failures == 1)
      spdlog::warn("agent: heartbeat failed: {}; serving on the last config", why);
    boost::asio::post(
        io_, [this, why] { control_state_ = "serving last config, control unreachable: " + why; });
  }
}

void AgentServer::use_relays(const std::vector<HostPort>& relays) {
  if (stopping_) return;
  if (!relay_) {
    RelayClientOptions o;
    o.ca_file = (!options_.control_ca.empty() ? options_.control_ca : options_.state_dir / "ca.crt")
                    .string();
    o.private_pem = slurp(options_.state_dir / "node.key");
    relay_ = std::make_unique<RelayGroup>(
        io_, std::move(o), [this](const relay::NodeKey& from, const uint8_t* data, size_t len) {
          if (p2p_) p2p_->on_relay_packet(from, data, len);
        });
    if (p2p_) p2p_->set_relay(relay_.get());
  }
  relay_->set_relays(relays);
}

std::optional<NatCandidates> AgentServer::probe_nat_via_control(
    const std::string& heartbeat_answer) {
  json::error_code ec;
  const auto v = json::parse(heartbeat_answer, ec);
  const auto* stun = !ec && v.is_object() ? v.as_object().if_contains("stun") : nullptr;
  if (!stun || !stun->is_object() || !stun->as_object().contains("port")) return std::nullopt;
  const auto url = boost::urls::parse_uri(options_.control_url);
  if (!url) return std::nullopt;
  const auto port = static_cast<uint16_t>(stun->at("port").to_number<int64_t>());
  Result<NatCandidates> found = make_error("no answer");
  if (p2p_started_) {
    // The QUIC socket itself asks, so the reflexive port is the one peers must punch to.
    boost::asio::io_context resolver_io;
    boost::asio::ip::udp::resolver resolver(resolver_io);
    boost::system::error_code ec;
    auto addrs = resolver.resolve(boost::asio::ip::udp::v4(), std::string(url->host()),
                                  std::to_string(port), ec);
    if (ec || addrs.empty()) {
      spdlog::warn("agent: cannot resolve control's STUN address {}", std::string(url->host()));
      return std::nullopt;
    }
    auto done = std::make_shared<std::promise<Result<NatReport>>>();
    auto future = done->get_future();
    boost::asio::post(io_, [this, done, server = addrs.begin()->endpoint()] {
      if (!p2p_) return done->set_value(make_error("P2P endpoint stopped"));
      p2p_->stun({server}, [done](Result<NatReport> r) { done->set_value(std::move(r)); });
    });
    if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready) return std::nullopt;
    auto report = future.get();
    found = report ? Result<NatCandidates>(candidates_from(*report))
                   : Result<NatCandidates>(make_error(report.error()));
  } else {
    found = discover_nat(std::string(url->host()), port, options_.quic_port);
  }
  if (!found) {
    spdlog::warn("agent: NAT discovery failed: {}", found.error());
    return std::nullopt;
  }
  spdlog::info("agent: reflexive address {} ({} mapping), candidates {}", found->reflexive,
               found->mapping, fmt::join(found->candidates, " "));
  return std::move(*found);
}

// Long-polls control for this agent's slice of the registry. Each answer is a delta (or a full
// resync) carrying a revision; after a reconnect the watch resumes from the last one.
void AgentServer::watch_loop() {
  while (!stopping_ && !fs::exists(options_.state_dir / "node.crt"))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::mt19937 rng(std::random_device{}());
  std::chrono::milliseconds backoff(500);
  int64_t since = view_.revision();  // read before the io thread runs anything that changes it
  while (!stopping_) {
    HttpCall call = control_call(
        "/v1/watch?timeout=20s" + (since >= 0 ? "&since=" + std::to_string(since) : ""), true);
    call.timeout = std::chrono::seconds(30);
    auto res = http_call(call);
    boost::system::error_code ec;
    json::value v;
    if (res && res->status == 200) v = json::parse(res->body, ec);
    if (res && res->status == 200 && !ec && v.is_object() && v.as_object().contains("revision") &&
        v.at("revision").is_int64()) {
      since = v.at("revision").as_int64();
      backoff = std::chrono::milliseconds(500);
      boost::asio::post(io_, [this, d = std::move(v.as_object())] {
        const bool changed = d.at("full").as_bool() || !d.at("put").as_array().empty() ||
                             !d.at("deleted").as_array().empty();
        if (auto ok = view_.apply(d); !ok) {
          spdlog::error("agent: bad watch answer: {}", ok.error());
          return;
        }
        watch_state_ = "watching at revision " + std::to_string(view_.revision());
        if (!changed) return;
        view_.save(options_.state_dir / "view.json");
        rebuild_dataplane();
      });
      continue;
    }
    const std::string why =
        res ? "control answered " + std::to_string(res->status) + ": " + res->body : res.error();
    boost::asio::post(io_, [this, why] {
      watch_state_ = "serving last config (revision " + std::to_string(view_.revision()) +
                     "), watch failing: " + why;
    });
    spdlog::warn("agent: watch failed: {}; retrying in {} ms", why, backoff.count());
    const auto wait = backoff + std::chrono::milliseconds(std::uniform_int_distribution<int>(
                                    0, static_cast<int>(backoff.count() / 2))(rng));
    for (auto waited = std::chrono::milliseconds(0); waited < wait && !stopping_;
         waited += std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
  }
}

// The proxy config that follows from the view: exports as HBONE inbound targets, imports as
// local listeners that tunnel to the agents hosting them.
void AgentServer::rebuild_dataplane() {
  if (!fs::exists(options_.state_dir / "node.crt")) return;
  json::array targets, services, outbound;
  std::string summary;
  exports_ = view_.exports(id_);
  for (const auto& e : exports_) {
    json::array allow;
    for (const auto& a : e.allow) allow.push_back(json::value(a));
    targets.push_back(json::object{
        {"authority", e.authority}, {"address", e.target.to_string()}, {"allow", allow}});
    summary += " export " + e.authority + "->" + e.target.to_string();
  }
  json::array all_services;  // for sidecars, whose listeners are their own
  const auto gateways = update_p2p(view_.agents());
  std::vector<P2pImport> direct;
  for (const auto& imp : view_.imports(id_)) {
    json::array addrs, ids;
    P2pImport over_quic{
        imp.service, HostPort{options_.resource_address, imp.port}, imp.authority, {}};
    for (size_t i = 0; i < imp.peers.size(); ++i) {
      auto gw = gateways.find(imp.peer_agents[i]);
      addrs.push_back(
          json::value(gw != gateways.end() ? gw->second.to_string() : imp.peers[i].to_string()));
      if (auto g = gateways_.find(imp.peer_agents[i]); g != gateways_.end())
        over_quic.peers.push_back(P2pImportPeer{g->second.key, g->second.name, imp.peer_ids[i]});
    }
    for (const auto& id : imp.peer_ids) ids.push_back(json::value(id));
    const json::object service{{"name", imp.service},
                               {"addresses", addrs},
                               {"authority", imp.authority},
                               {"spiffe_ids", ids}};
    all_services.push_back(service);
    if (port_taken(imp.port, "")) {
      spdlog::warn("agent: cannot import {}: port {} is taken by a local resource", imp.service,
                   imp.port);
      continue;
    }
    // Every host reached over P2P: the agent serves the import itself (agent/p2p_imports.h).
    // Sidecars, whose identity is their own, keep HBONE through the gateways.
    if (p2p_ && over_quic.peers.size() == imp.peers.size()) {
      summary += " import " + imp.service + "@" + over_quic.listen.to_string() + " (P2P)";
      direct.push_back(std::move(over_quic));
      continue;
    }
    services.push_back(service);
    outbound.push_back(
        json::object{{"name", imp.service},
                     {"listen", HostPort{options_.resource_address, imp.port}.to_string()},
                     {"service", imp.service}});
    summary +=
        " import " + imp.service + "@" + HostPort{options_.resource_address, imp.port}.to_string();
  }
  json::object config{
      {"identity",
       {{"cert", (options_.state_dir / "node.crt").string()},
        {"key", (options_.state_dir / "node.key").string()},
        {"ca", (options_.state_dir / "ca.crt").string()}}},
      {"workers", 1},
      {"admin", {{"listen", "127.0.0.1:0"}}},
      {"drain_timeout", "5s"},
      {"inbound", {{"listen", options_.hbone_listen.to_string()}, {"targets", targets}}},
      {"services", services},
      {"outbound", outbound}};
  if (sds_) sds_->set_services(all_services);
  if (summary != dataplane_summary_)
    spdlog::info("agent: data plane at revision {}:{}", view_.revision(),
                 summary.empty() ? " nothing to import or export" : summary);
  dataplane_summary_ = summary;
  if (p2p_) {
    if (!p2p_imports_)
      p2p_imports_ = std::make_unique<P2pImports>(io_, *p2p_, metrics_, access_log_, spiffe_id_);
    for (const auto& [service, why] : p2p_imports_->set(direct))
      spdlog::error("agent: cannot import {}: {}", service, why);
  }
  dataplane_->apply(json::serialize(config) + "\n");
}

void AgentServer::start_p2p() {
  P2pOptions o;
  o.listen = boost::asio::ip::udp::endpoint(boost::asio::ip::udp::v6(), options_.quic_port);
  o.private_pem = slurp(options_.state_dir / "node.key");
  o.quic.keepalive = options_.quic_keepalive;
  o.quic.idle_timeout = options_.quic_idle_timeout;
  o.relay_only = options_.p2p_paths == "relay-only";
  auto p2p = P2pEndpoint::start(io_, std::move(o));
  if (!p2p) throw std::runtime_error(p2p.error() + " (set --quic-port, or --p2p off)");
  p2p_ = std::move(*p2p);
  p2p_started_ = true;
  p2p_->set_authorize([this](const std::string& peer, const std::string& authority) {
    return authorize_tunnel(peer, authority);
  });
  p2p_->set_accepted_tunnel_done(
      [this](const std::string& peer, const quic::QuicTunnel& t, const std::string& result) {
        AccessLogEntry e;
        e.direction = "inbound";
        e.listener = "p2p";
        e.peer_identity = peer;
        e.local_identity = spiffe_id_;
        e.authority = t.authority();
        e.upstream = t.target();
        e.result = result;
        e.start = t.started();
        e.bytes_received = t.bytes_to_tcp();
        e.bytes_sent = t.bytes_from_tcp();
        access_log_.write(e);
        // Streams to an export are this agent's service traffic (those to the data plane's
        // HBONE inbound are counted there).
        const auto service = t.authority().substr(0, t.authority().rfind(':'));
        if (!t.target().empty() &&
            std::any_of(exports_.begin(), exports_.end(),
                        [&](const MeshExport& x) { return x.authority == t.authority(); })) {
          auto c = metrics_.tcp({"destination", peer, spiffe_id_, service, "mutual_tls"});
          ++c->opened;
          ++c->closed;
          c->received_bytes += e.bytes_received;
          c->sent_bytes += e.bytes_sent;
        }
      });
  load_p2p_tls();
  spdlog::info("agent: P2P endpoint on UDP {} ({} peers over QUIC)", p2p_->port(),
               options_.p2p == "always" ? "all" : "other clusters'");
}

void AgentServer::load_p2p_tls() {
  if (!p2p_ || !fs::exists(options_.state_dir / "node.crt")) return;
  const auto cert = fs::path(options_.state_dir / "node.crt");
  std::string td;
  if (auto info = load_certificate_info(cert)) {
    if (auto id = info->spiffe_id())
      if (auto t = spiffe_trust_domain(*id)) td = *t;
  }
  auto tls = quic::QuicTls::create(slurp(cert), slurp(options_.state_dir / "node.key"),
                                   slurp(options_.state_dir / "ca.crt"), td);
  if (!tls) return spdlog::error("agent: P2P: {}", tls.error());
  p2p_->set_tls(*tls);
}

quic::TunnelVerdict AgentServer::authorize_tunnel(const std::string& peer,
                                                  const std::string& authority) const {
  // A peer's tunnel may reach one thing here: this agent's HBONE inbound, where the data plane
  // applies the mesh policies to the workload identity inside.
  quic::TunnelVerdict v;
  if (peer.find("/node/") == std::string::npos) {
    v.status = 401;
    v.reason = "only agents (node identities) may open P2P tunnels; " + peer + " is not one";
    return v;
  }
  // A stream to one of our exports goes straight to its resource (agent/p2p_imports.h).
  if (auto td = spiffe_trust_domain(spiffe_id_))
    if (auto to_export = authorize_export(exports_, *td, peer, authority)) return *to_export;
  const uint16_t port = hbone_port_;
  if (port == 0) {
    v.status = 503;
    v.reason = "the data plane is not listening yet";
    return v;
  }
  const std::string ours = HostPort{advertise_address_, port}.to_string();
  if (authority != ours) {
    v.status = 400;
    v.reason = "unknown authority " + authority + "; this agent serves HBONE at " + ours;
    return v;
  }
  const std::string& host = options_.hbone_listen.host;
  v.target = HostPort{host == "0.0.0.0" || host == "::" ? "127.0.0.1" : host, port};
  return v;
}

namespace {
std::optional<relay::NodeKey> parse_node_key(const std::string& hex) {
  if (hex.size() != 64) return std::nullopt;
  relay::NodeKey k{};
  for (size_t i = 0; i < 32; ++i) {
    unsigned v = 0;
    if (std::sscanf(hex.c_str() + 2 * i, "%2x", &v) != 1) return std::nullopt;
    k[i] = static_cast<uint8_t>(v);
  }
  return k;
}
}  // namespace

std::map<std::string, HostPort> AgentServer::update_p2p(const std::vector<MeshAgent>& agents) {
  std::map<std::string, HostPort> out;
  if (!p2p_) return out;
  std::vector<P2pPeer> peers;
  std::set<std::string> wanted;
  for (const auto& a : agents) {
    auto key = parse_node_key(a.node_key);
    if (a.id == id_ || !a.p2p || !key) continue;
    P2pPeer p;
    p.key = *key;
    p.name = a.name.empty() ? a.id : a.name;
    p.spiffe_id = a.spiffe_id;
    for (const auto& c : a.candidates) {
      auto hp = parse_host_port(c);
      boost::system::error_code ec;
      auto ip = hp ? boost::asio::ip::make_address(hp->host, ec) : boost::asio::ip::address();
      if (hp && !ec) p.candidates.emplace_back(ip, hp->port);
    }
    peers.push_back(p);
    if (options_.p2p != "always" && a.cluster == options_.cluster_id) continue;
    if (a.hbone.empty()) continue;
    auto& gw = gateways_[a.id];
    if (!gw.acceptor) {
      gw.acceptor = std::make_shared<boost::asio::ip::tcp::acceptor>(io_);
      boost::system::error_code ec;
      const boost::asio::ip::tcp::endpoint local(boost::asio::ip::make_address("127.0.0.1"), 0);
      gw.acceptor->open(local.protocol(), ec);
      if (!ec) gw.acceptor->bind(local, ec);
      if (!ec) gw.acceptor->listen(boost::asio::socket_base::max_listen_connections, ec);
      if (ec) {
        spdlog::error("agent: cannot open a P2P gateway for {}: {}", p.name, ec.message());
        gateways_.erase(a.id);
        continue;
      }
      gw.port = gw.acceptor->local_endpoint().port();
      accept_gateway(a.id);
    }
    gw.key = *key;
    gw.name = p.name;
    gw.authority = a.hbone;
    wanted.insert(a.id);
    out[a.id] = HostPort{"127.0.0.1", gw.port};
  }
  for (auto it = gateways_.begin(); it != gateways_.end();) {
    if (wanted.count(it->first)) {
      ++it;
      continue;
    }
    boost::system::error_code ignored;
    it->second.acceptor->close(ignored);
    it = gateways_.erase(it);
  }
  p2p_->set_peers(std::move(peers));
  return out;
}

void AgentServer::accept_gateway(const std::string& agent_id) {
  auto it = gateways_.find(agent_id);
  if (it == gateways_.end()) return;
  auto acceptor = it->second.acceptor;
  acceptor->async_accept([this, agent_id, acceptor](const boost::system::error_code& ec,
                                                    boost::asio::ip::tcp::socket socket) {
    if (ec) return;  // closed
    auto it = gateways_.find(agent_id);
    if (it == gateways_.end() || it->second.acceptor != acceptor || !p2p_) return;
    boost::system::error_code ignored;
    socket.set_option(boost::asio::ip::tcp::no_delay(true), ignored);
    p2p_->connect(
        it->second.key, std::move(socket), it->second.authority,
        [name = it->second.name](const std::string& result, uint64_t sent, uint64_t received) {
          spdlog::debug("p2p: tunnel to {}: {} ({} B sent, {} B received)", name, result, sent,
                        received);
        });
    accept_gateway(agent_id);
  });
}

json::object AgentServer::agent_json() const {
  json::array blocks, nets, routes;
  for (const auto& b : mesh_blocks_) blocks.push_back(json::value(b));
  for (const auto& n : options_.networks) nets.push_back(json::value(n));
  for (const auto& r : options_.advertise_routes) routes.push_back(json::value(r));
  // private_key is never part of it (the seed's AgentConfig skips it too).
  return {{"id", id_},
          {"name", options_.name},
          {"cluster_id", options_.cluster_id},
          {"public_key", public_key_b64_},
          {"listen_port", options_.quic_port},
          {"assigned_ip", assigned_ip_.empty() ? json::value(nullptr) : json::value(assigned_ip_)},
          {"mesh_blocks", blocks},
          {"networks", nets},
          {"advertised_routes", routes},
          {"spiffe_id", spiffe_id_},
          {"registered_at",
           registered_at_.empty() ? json::value(nullptr) : json::value(registered_at_)}};
}

void AgentServer::save_agent() const {
  write_file_atomic(options_.state_dir / "agent.json", json::serialize(agent_json()) + "\n", 0644);
}

void AgentServer::save_resources() {
  json::array a;
  std::map<std::string, std::string> desired;
  for (const auto& [id, p] : proxies_) {
    a.push_back(p.resource.to_json());
    desired[id] = json::serialize(p.resource.to_json());
  }
  write_file_atomic(options_.state_dir / "resources.json", json::serialize(a) + "\n", 0644);
  {
    std::lock_guard lock(sync_mutex_);
    desired_resources_ = std::move(desired);
    sync_wanted_ = true;
  }
  sync_cv_.notify_all();
}

std::string AgentServer::open_proxy(Proxy& p) {
  auto l = Listener::bind(io_, "resource/" + p.resource.id,
                          HostPort{options_.resource_address, p.resource.mesh_port});
  if (!l) return l.error();
  p.listener = *l;
  const Resource r = p.resource;
  p.listener->start([this, r](tcp::socket downstream) {
    auto down = std::make_shared<tcp::socket>(std::move(downstream));
    auto up = std::make_shared<tcp::socket>(io_);
    auto resolver = std::make_shared<tcp::resolver>(io_);
    resolver->async_resolve(
        r.target_host, std::to_string(r.target_port),
        [this, down, up, resolver, r](const boost::system::error_code& ec,
                                      tcp::resolver::results_type res) {
          if (ec)
            return spdlog::warn("resource {}: cannot resolve {}: {}", r.id, r.target_host,
                                ec.message());
          boost::asio::async_connect(
              *up, res,
              [this, down, up, r](const boost::system::error_code& ec, const tcp::endpoint&) {
                if (ec)
                  return spdlog::warn("resource {}: cannot connect to {}:{}: {}", r.id,
                                      r.target_host, r.target_port, ec.message());
                auto counters = metrics_.tcp({"destination", "", "", r.name, "none"});
                std::make_shared<SpliceRelay>(std::move(*down), std::move(*up), counters, metrics_,
                                              nullptr)
                    ->start();
              });
        });
  });
  return "";
}

void AgentServer::close_proxy(Proxy& p) {
  // Only the listener closes: connections already relaying finish on their own (drain, not cut).
  if (p.listener) p.listener->close();
  p.listener.reset();
}

bool AgentServer::port_taken(uint16_t port, const std::string& except_id) const {
  for (const auto& [id, p] : proxies_)
    if (id != except_id && p.resource.mesh_port == port) return true;
  return port == options_.api_port;
}

bool AgentServer::authorized(const HttpRequest& r) const {
  const std::string want = "Bearer " + options_.api_token;
  return r.authorization.size() == want.size() &&
         CRYPTO_memcmp(r.authorization.data(), want.data(), want.size()) == 0;
}

HttpResponse AgentServer::handle(const HttpRequest& r) {
  const bool get = r.method == "GET";
  if (!get && !authorized(r))
    return json_error(
        401, "changes need 'Authorization: Bearer <token>' (the token is in <state>/api.token)");
  if (r.path == "/health" && get) return {200, "{\"status\":\"ok\"}\n"};
  if (r.path == "/metrics" && get) {
    // Resource proxies' traffic, and the P2P endpoint: each peer's path and RTT, probes,
    // relay use, call-me-maybe offers.
    HttpResponse out{200, metrics_.prometheus() + (p2p_ ? p2p_->metrics_text() : std::string())};
    out.content_type = "text/plain; version=0.0.4";
    return out;
  }
  if (r.path == "/agent" && get) return {200, json::serialize(agent_json()) + "\n"};
  if (r.path == "/agent/keys" && get)
    return {200, json::serialize(json::object{
                     {"id", id_}, {"public_key", public_key_b64_}, {"algorithm", "ed25519"}}) +
                     "\n"};
  if (r.path == "/status" && get) {
    json::array res;
    for (const auto& [id, p] : proxies_) res.push_back(p.resource.to_json());
    const auto up = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::steady_clock::now() - started_)
                        .count();
    return {200, json::serialize(json::object{
                     {"agent", agent_json()},
                     {"control", {{"url", options_.control_url}, {"state", control_state_}}},
                     {"mesh",
                      {{"revision", view_.revision()},
                       {"watch", watch_state_},
                       {"objects", view_.size()},
                       {"dataplane", dataplane_summary_}}},
                     {"relays", relay_ ? json::value(relay_->status()) : json::value(nullptr)},
                     {"sds", sds_ ? json::value(sds_->status_json()) : json::value(nullptr)},
                     {"p2p", p2p_ ? json::value(p2p_->status()) : json::value(nullptr)},
                     {"p2p_imports", p2p_imports_ ? json::value(p2p_imports_->status())
                                                  : json::value(json::array())},
                     {"resources", res},
                     {"active_connections", metrics_.downstream_connections_active.get()},
                     {"uptime_s", up}}) +
                     "\n"};
  }
  if (r.path == "/resources" && get) {
    json::array res;
    for (const auto& [id, p] : proxies_) res.push_back(p.resource.to_json());
    return {200, json::serialize(res) + "\n"};
  }
  if (r.path == "/resources/add") {
    if (r.method != "POST") return json_error(405, "use POST");
    return add_resource(r);
  }
  if (r.path.rfind("/resources/", 0) == 0) {
    const std::string id = r.path.substr(11);
    auto it = proxies_.find(id);
    if (it == proxies_.end()) return json_error(404, "no resource " + id);
    if (get) return {200, json::serialize(it->second.resource.to_json()) + "\n"};
    if (r.method == "PUT") return put_resource(id, r);
    if (r.method == "DELETE") return delete_resource(id);
    return json_error(405, "use GET, PUT or DELETE");
  }
  if (r.path == "/proxies" && get) {
    json::array out;
    for (const auto& [id, p] : proxies_)
      out.push_back(json::object{
          {"resource_id", id},
          {"listen", HostPort{options_.resource_address, p.resource.mesh_port}.to_string()},
          {"target", p.resource.target_host + ":" + std::to_string(p.resource.target_port)},
          {"enabled", p.resource.enabled},
          {"listening", p.listener != nullptr}});
    return {200, json::serialize(out) + "\n"};
  }
  if (r.path.rfind("/proxies/", 0) == 0 && r.path.size() > 16 &&
      r.path.substr(r.path.size() - 7) == "/toggle") {
    if (r.method != "POST") return json_error(405, "use POST");
    return toggle(r.path.substr(9, r.path.size() - 16));
  }
  return json_error(404, "no such endpoint: " + r.method + " " + r.path);
}

HttpResponse AgentServer::add_resource(const HttpRequest& r) {
  FieldError fe;
  auto res = decode_resource(r.body, fe);
  if (!res) return json_error(400, fe.message, fe.field);
  if (!res->agent_id.empty() && res->agent_id != id_)
    return json_error(400, "agent_id " + res->agent_id + " is not this agent (" + id_ + ")",
                      "agent_id");
  if (proxies_.count(res->id))
    return json_error(409, "resource " + res->id + " already exists", "id");
  if (port_taken(res->mesh_port, ""))
    return json_error(409, "port " + std::to_string(res->mesh_port) + " is already in use",
                      "mesh_port");
  res->agent_id = id_;
  res->mesh_ip = assigned_ip_;
  Proxy p{*res, nullptr, ""};
  if (p.resource.enabled) {
    if (auto err = open_proxy(p); !err.empty()) return json_error(409, err, "mesh_port");
  }
  proxies_[res->id] = std::move(p);
  save_resources();
  spdlog::info("agent: resource {} added: :{} -> {}:{}", res->id, res->mesh_port, res->target_host,
               res->target_port);
  return {200, json::serialize(res->to_json()) + "\n"};
}

HttpResponse AgentServer::put_resource(const std::string& id, const HttpRequest& r) {
  FieldError fe;
  auto res = decode_resource(r.body, fe);
  if (!res) return json_error(400, fe.message, fe.field);
  if (!res->id.empty() && res->id.rfind("res-", 0) != 0 && res->id != id)
    return json_error(400, "id in the body does not match the URL", "id");
  res->id = id;
  res->agent_id = id_;
  res->mesh_ip = assigned_ip_;
  if (port_taken(res->mesh_port, id))
    return json_error(409, "port " + std::to_string(res->mesh_port) + " is already in use",
                      "mesh_port");
  Proxy& p = proxies_[id];
  Proxy next{*res, nullptr, ""};
  close_proxy(p);  // open connections keep running; new ones use the new target
  if (next.resource.enabled) {
    if (auto err = open_proxy(next); !err.empty()) {
      open_proxy(p);  // put the old one back
      return json_error(409, err, "mesh_port");
    }
  }
  p = std::move(next);
  save_resources();
  return {200, json::serialize(p.resource.to_json()) + "\n"};
}

HttpResponse AgentServer::delete_resource(const std::string& id) {
  close_proxy(proxies_[id]);
  proxies_.erase(id);
  save_resources();
  spdlog::info("agent: resource {} removed; its open connections drain", id);
  return {200, json::serialize(json::object{{"deleted", id}}) + "\n"};
}

HttpResponse AgentServer::toggle(const std::string& id) {
  auto it = proxies_.find(id);
  if (it == proxies_.end()) return json_error(404, "no resource " + id);
  Proxy& p = it->second;
  if (p.resource.enabled) {
    close_proxy(p);
    p.resource.enabled = false;
  } else {
    if (auto err = open_proxy(p); !err.empty()) return json_error(409, err, "mesh_port");
    p.resource.enabled = true;
  }
  save_resources();
  return {200, json::serialize(p.resource.to_json()) + "\n"};
}

}  // namespace weft
