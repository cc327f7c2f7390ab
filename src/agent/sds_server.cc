#include "agent/sds_server.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/json.hpp>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "core/duration.h"
#include "core/label.h"
#include "identity/certificate_info.h"
#include "identity/spiffe_id.h"

namespace weft {

namespace asio = boost::asio;
namespace json = boost::json;

namespace {

int64_t to_ms(std::time_t t) { return static_cast<int64_t>(t) * 1000; }

}  // namespace

struct SdsServer::Shared {
  struct Job {
    std::string key, ns, sa, csr;
    std::function<void()> task;  // set: run this instead (a pair-key request)
  };
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Job> jobs;
  bool stop = false;
  std::thread thread;
};

SdsServer::SdsServer(asio::io_context& io, SdsOptions options, Signer sign)
    : io_(io),
      options_(std::move(options)),
      sign_(std::move(sign)),
      shared_(std::make_shared<Shared>()) {}

Result<std::unique_ptr<SdsServer>> SdsServer::start(asio::io_context& io, SdsOptions options,
                                                    Signer sign, PairKeyFetcher pair_key) {
  std::unique_ptr<SdsServer> s(new SdsServer(io, std::move(options), std::move(sign)));
  s->pair_key_ = std::move(pair_key);
  // Anyone may connect; the peer uid decides (the socket file alone cannot name several uids).
  auto server = HttpServer::bind_unix(
      io, s->options_.socket, 0666, [raw = s.get()](const HttpRequest& r, HttpServer::Reply reply) {
        raw->handle(r, std::move(reply));
      });
  if (!server) return make_error(server.error());
  s->server_ = std::move(*server);
  s->shared_->thread = std::thread([raw = s.get()] { raw->worker_loop(); });
  return s;
}

SdsServer::~SdsServer() {
  if (server_) server_->close();
  {
    std::lock_guard lock(shared_->mutex);
    shared_->stop = true;
  }
  shared_->cv.notify_all();
  if (shared_->thread.joinable()) shared_->thread.join();
}

void SdsServer::worker_loop() {
  for (;;) {
    Shared::Job job;
    {
      std::unique_lock lock(shared_->mutex);
      shared_->cv.wait(lock, [&] { return shared_->stop || !shared_->jobs.empty(); });
      if (shared_->stop) return;
      job = std::move(shared_->jobs.front());
      shared_->jobs.pop_front();
    }
    if (job.task) {
      job.task();
      continue;
    }
    auto result = sign_(job.ns, job.sa, job.csr);
    asio::post(io_, [this, key = job.key, result = std::move(result)]() mutable {
      signed_(key, std::move(result));
    });
  }
}

bool SdsServer::has_valid_certificate(const Workload& w) const {
  return !w.certificate.empty() && std::time(nullptr) < w.not_after;
}

HttpResponse SdsServer::material(const Workload& w) const {
  // The private key leaves the agent only here, to a process whose uid was checked.
  return {200, json::serialize(json::object{{"spiffe_id", w.spiffe_id},
                                            {"certificate", w.certificate},
                                            {"private_key", w.key.private_pem},
                                            {"ca_bundle", w.ca_bundle},
                                            {"serial", w.serial},
                                            {"expires_at_ms", to_ms(w.not_after)}}) +
                   "\n"};
}

void SdsServer::sign_async(Workload& w) {
  if (w.signing) return;
  auto csr = make_csr(w.key.private_pem, w.sa);
  if (!csr) {
    w.error_status = 500;
    w.error = "cannot make a CSR: " + csr.error();
    return answer_waiters(w);
  }
  w.signing = true;
  {
    std::lock_guard lock(shared_->mutex);
    shared_->jobs.push_back({w.ns + "/" + w.sa, w.ns, w.sa, *csr, nullptr});
  }
  shared_->cv.notify_one();
}

void SdsServer::signed_(const std::string& key, SignedWorkload result) {
  auto it = workloads_.find(key);
  if (it == workloads_.end()) return;
  Workload& w = it->second;
  w.signing = false;
  auto retry_in = std::chrono::seconds(5);
  if (result.status == 200) {
    auto info = parse_certificate_info(result.certificate, "control's certificate for " + key);
    if (info) {
      w.spiffe_id = result.spiffe_id;
      w.certificate = std::move(result.certificate);
      w.ca_bundle = std::move(result.ca_bundle);
      w.serial = info->serial_hex;
      w.not_before = info->not_before;
      w.not_after = info->not_after;
      w.error_status = 0;
      w.error.clear();
      spdlog::info("sds: certificate for {} serial {} expires {}", w.spiffe_id, w.serial,
                   format_utc(w.not_after));
      // Renew at 2/3 of its life, as the node certificate is. Certificates are backdated a
      // minute for clock skew: count the life from when this one arrived.
      const std::time_t start = std::max(w.not_before, std::time(nullptr));
      const auto renew_at = start + (w.not_after - start) * 2 / 3;
      retry_in = std::chrono::seconds(std::max<std::time_t>(1, renew_at - std::time(nullptr)));
    } else {
      result.status = 502;
      result.error = info.error();
    }
  }
  if (result.status != 200) {
    w.error_status = result.status == 0 ? 503 : result.status;
    w.error = result.error;
    spdlog::warn("sds: no certificate for ns/{}/sa/{}: {}{}", w.ns, w.sa, w.error,
                 has_valid_certificate(w) ? " (the current one stays in use)" : "");
  }
  answer_waiters(w);
  w.renew->expires_after(retry_in);
  w.renew->async_wait([this, key](const boost::system::error_code& ec) {
    if (ec) return;
    auto it = workloads_.find(key);
    if (it != workloads_.end()) sign_async(it->second);
  });
}

void SdsServer::answer_waiters(Workload& w) {
  const bool valid = has_valid_certificate(w);
  for (auto it = w.waiters.begin(); it != w.waiters.end();) {
    auto next = std::next(it);
    if (valid ? it->known_serial != w.serial : !w.signing) {
      auto reply = std::move(it->reply);
      it->deadline->cancel();
      w.waiters.erase(it);
      reply(valid ? material(w) : json_error(w.error_status, w.error));
    }
    it = next;
  }
}

void SdsServer::handle(const HttpRequest& r, HttpServer::Reply reply) {
  const int uid = r.peer_uid;
  const auto& allowed = options_.allowed_uids;
  if (uid != static_cast<int>(::geteuid()) && uid != 0 &&
      std::find(allowed.begin(), allowed.end(), uid) == allowed.end()) {
    spdlog::warn("sds: refused a process of uid {}", uid);
    return reply(json_error(403, "uid " + std::to_string(uid) +
                                     " may not use this SDS socket; start the agent with "
                                     "--sds-allow-uid " +
                                     std::to_string(uid)));
  }
  if (r.method != "GET") return reply(json_error(405, "use GET"));
  Millis timeout = std::chrono::seconds(60);
  if (const auto t = query_param(r.query, "timeout"); !t.empty()) {
    auto d = parse_duration(t);
    if (!d || *d > std::chrono::minutes(5))
      return reply(json_error(400, "timeout must be a duration up to 5m, like 60s", "timeout"));
    timeout = *d;
  }
  if (r.path == "/v1/sds/services") return handle_services(r, std::move(reply), timeout);
  if (r.path == "/v1/sds/hmac-key") return handle_pair_key(r, std::move(reply));
  if (r.path != "/v1/sds/certificate")
    return reply(json_error(404,
                            "no such path; the SDS socket serves /v1/sds/certificate, "
                            "/v1/sds/services and /v1/sds/hmac-key"));
  const std::string ns = query_param(r.query, "namespace");
  const std::string sa = query_param(r.query, "service_account");
  if (!is_valid_label(ns))
    return reply(json_error(400, "namespace must be 1-63 of a-z, 0-9, '-', '.', '_'", "namespace"));
  if (!is_valid_label(sa))
    return reply(json_error(400, "service_account must be 1-63 of a-z, 0-9, '-', '.', '_'",
                            "service_account"));
  const std::string known = query_param(r.query, "serial");
  const std::string key = ns + "/" + sa;
  auto [it, added] = workloads_.try_emplace(key);
  Workload& w = it->second;
  if (added) {
    w.ns = ns;
    w.sa = sa;
    w.key = generate_ed25519();
    w.renew = std::make_unique<asio::steady_timer>(io_);
  }
  const bool valid = has_valid_certificate(w);
  if (valid && known != w.serial) return reply(material(w));
  if (!valid) {
    // A first request, or one that failed before (the workload may be registered by now).
    if (known.empty()) timeout = std::min<Millis>(timeout, std::chrono::seconds(15));
    sign_async(w);
  }
  w.waiters.push_back({known, std::move(reply), std::make_unique<asio::steady_timer>(io_)});
  auto waiter = std::prev(w.waiters.end());
  waiter->deadline->expires_after(timeout);
  waiter->deadline->async_wait([this, key, waiter](const boost::system::error_code& ec) {
    if (ec) return;
    Workload& w = workloads_.at(key);
    auto reply = std::move(waiter->reply);
    w.waiters.erase(waiter);
    if (has_valid_certificate(w)) return reply(material(w));
    reply(json_error(w.error_status ? w.error_status : 503,
                     w.error.empty() ? "no certificate from control yet" : w.error));
  });
}

void SdsServer::handle_pair_key(const HttpRequest& r, HttpServer::Reply reply) {
  const std::string source = query_param(r.query, "source");
  const std::string destination = query_param(r.query, "destination");
  for (const auto& [name, id] :
       {std::pair{"source", source}, std::pair{"destination", destination}})
    if (auto ok = parse_spiffe_id(id); !ok)
      return reply(json_error(400, std::string(name) + ": " + ok.error(), name));
  if (!pair_key_) return reply(json_error(503, "this agent does not serve HMAC keys"));
  {
    std::lock_guard lock(shared_->mutex);
    Shared::Job job;
    // Control decides whether this node may have the key (it hosts one end of the pair).
    job.task = [this, source, destination, reply = std::move(reply)]() mutable {
      PairKey k = pair_key_(source, destination);
      asio::post(io_, [reply = std::move(reply), k = std::move(k)]() mutable {
        if (k.status != 200) return reply(json_error(k.status ? k.status : 503, k.error));
        // The key leaves the agent only here, to a process whose uid was checked.
        json::object out{{"key", k.key}};
        if (!k.previous.empty()) {
          out["previous_key"] = k.previous;
          out["sign_with_previous"] = k.sign_with_previous;
        }
        reply({200, json::serialize(out) + "\n"});
      });
    };
    shared_->jobs.push_back(std::move(job));
  }
  shared_->cv.notify_one();
}

HttpResponse SdsServer::services_response() const {
  return {200, "{\"revision\":" + std::to_string(services_revision_) +
                   ",\"services\":" + (services_.empty() ? "[]" : services_) + "}\n"};
}

void SdsServer::set_services(const json::array& services) {
  std::string text = json::serialize(services);
  if (text == services_) return;
  services_ = std::move(text);
  ++services_revision_;
  for (auto& w : services_waiters_) {
    w.deadline->cancel();
    w.reply(services_response());
  }
  services_waiters_.clear();
}

void SdsServer::handle_services(const HttpRequest& r, HttpServer::Reply reply, Millis timeout) {
  const std::string known = query_param(r.query, "revision");
  if (known != std::to_string(services_revision_)) return reply(services_response());
  services_waiters_.push_back({known, std::move(reply), std::make_unique<asio::steady_timer>(io_)});
  auto waiter = std::prev(services_waiters_.end());
  waiter->deadline->expires_after(timeout);
  waiter->deadline->async_wait([this, waiter](const boost::system::error_code& ec) {
    if (ec) return;  // answered by a change
    auto reply = std::move(waiter->reply);
    services_waiters_.erase(waiter);
    reply(services_response());
  });
}

json::array SdsServer::status_json() const {
  json::array out;
  for (const auto& [key, w] : workloads_) {
    json::object o{{"identity", "ns/" + key.substr(0, key.find('/')) + "/sa/" + w.sa},
                   {"waiting_sidecars", w.waiters.size()}};
    if (!w.certificate.empty()) {
      o["spiffe_id"] = w.spiffe_id;
      o["serial"] = w.serial;
      o["expires_at_ms"] = to_ms(w.not_after);
    }
    if (!w.error.empty()) o["error"] = w.error;
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace weft
