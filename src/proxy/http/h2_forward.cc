#include "proxy/http/h2_forward.h"

#include <nghttp2/nghttp2.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "proxy/http/h2_stream.h"
#include "proxy/http/hmac_signing.h"
#include "proxy/http/http_session.h"
#include "proxy/http/request_policy.h"
#include "proxy/http/router.h"

namespace weft {

namespace {

// The largest request kept for a retry on a gRPC status (Envoy keeps up to its buffer limit).
constexpr size_t kMaxReplay = 64 * 1024;

bool find_field(const void* ctx, std::string_view name, std::string_view& value) {
  const auto& s = *static_cast<const H2Downstream::Stream*>(ctx);
  if (name == "cookie" && !s.cookie.empty()) {
    value = s.cookie;
    return true;
  }
  for (const auto& [n, v] : s.fields)
    if (n == name) {
      value = v;
      return true;
    }
  return false;
}

// The gRPC status a client should see for a local HTTP answer (as Envoy maps them).
const char* grpc_status_for(unsigned http_status) {
  switch (http_status) {
    case 400:
      return "13";  // INTERNAL
    case 401:
      return "16";  // UNAUTHENTICATED
    case 403:
      return "7";  // PERMISSION_DENIED
    case 404:
      return "12";  // UNIMPLEMENTED
    case 504:
      return "4";  // DEADLINE_EXCEEDED
    case 429:
    case 502:
    case 503:
      return "14";  // UNAVAILABLE
    default:
      return "2";  // UNKNOWN
  }
}

// grpc-message is percent-encoded (gRPC over HTTP/2: "Percent-Encoded").
std::string grpc_message(std::string_view text) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

void set_field(H2Fields& fields, const std::string& name, const std::string& value) {
  std::erase_if(fields, [&](const auto& f) { return f.first == name; });
  fields.emplace_back(name, value);
}

void rewrite(H2Fields& fields, const HeaderRewrite& r) {
  for (const auto& name : r.remove)
    std::erase_if(fields, [&](const auto& f) { return f.first == name; });
  for (const auto& [name, value] : r.add) set_field(fields, name, value);
}

}  // namespace

bool H2Forward::take(H2Downstream& d, const std::shared_ptr<Stream>& s, bool end_stream) {
  const std::string host = normalize_host(s->authority);
  const std::string_view path = std::string_view(s->path).substr(0, s->path.find('?'));
  RequestView view;
  view.host = host;
  view.path = path;
  view.method = s->method;
  view.header = find_field;
  view.ctx = s.get();
  const RouteConfig* route = match_route(*d.view_.routes, view);
  if (!route) return false;  // the session answers 404
  for (const auto& b : route->backends) {
    const Cluster* c = d.snap_->http->cluster(b.service);
    if (!c || !c->service().http.h2) return false;
  }
  auto f = std::make_shared<H2Forward>(d, s);
  s->forward = f;
  f->start(*route, end_stream);
  return true;
}

H2Forward::H2Forward(H2Downstream& down, const std::shared_ptr<Stream>& s)
    : down_(down.weak_from_this()),
      d_(down),
      stream_(s),
      id_(s->id),
      timer_(down.env_.io),
      delay_(down.env_.io) {}

H2Forward::~H2Forward() = default;

void H2Forward::start(const RouteConfig& route, bool end_stream) {
  auto s = stream();
  const HttpListenerView& view = d_.view_;
  route_ = &route;
  request_done_ = end_stream;
  std::string_view value;
  grpc_ = find_field(s.get(), "content-type", value) && value.starts_with("application/grpc");
  source_ = view.downstream.empty() ? d_.client_ip_ : view.downstream;
  entry_.direction = view.inbound ? "inbound" : "outbound";
  entry_.listener = view.name;
  entry_.downstream = source_;
  entry_.protocol = "http/2";
  entry_.method = s->method;
  entry_.path = s->path;
  entry_.host = normalize_host(s->authority);
  entry_.route = route.name;
  if (d_.snap_->tls) entry_.local_identity = d_.snap_->tls->spiffe_id;
  if (view.inbound) entry_.peer_identity = view.peer_identity;

  const SteadyMillis now = steady_now_ms();
  const std::string_view path = std::string_view(s->path).substr(0, s->path.find('?'));
  if (view.inbound) {
    if (auto r = inbound_rate_limited(view, now)) return answer(*r);
    if (!admit_signature(end_stream)) return;
    if (auto r = authorization_refusal(view, s->method, path)) return answer(*r);
  }
  if (auto r = route_rate_limited(*d_.snap_->http, view.name, route, source_, now))
    return answer(*r);
  if (fault_roll(d_.env_.rng, route.fault.abort_percent))
    return answer({route.fault.abort_status, "fault injected: abort\n", "FI", {}});
  const WeightedBackend& backend = pick_backend(route, d_.env_.rng());
  cluster_ = d_.snap_->http->cluster(backend.service);
  entry_.upstream = backend.service;
  if (cluster_->endpoints().empty())
    return answer({503, "service '" + backend.service + "' has no endpoints\n", "UH", {}});
  if (auto r = take_request_slot(*cluster_)) return answer(*r);
  request_slot_ = true;
  if (!view.inbound) {
    // The keys of the newest config (a rotation reaches open connections too).
    const HttpServiceConfig* http = &cluster_->service().http;
    if (d_.env_.current && d_.env_.current != d_.snap_)
      if (const auto* n = d_.env_.current->config->find_service(cluster_->service().name))
        http = &n->http;
    hmac_key_ = http->hmac.key;
    signed_headers_ = http->hmac.signed_headers;
  }

  const auto& hash_header = cluster_->service().http.hash_header;
  hash_key_ = hash_header.empty()                       ? source_
              : find_field(s.get(), hash_header, value) ? std::string(value)
                                                        : std::string();
  replayable_ = grpc_ && route.retries.on_grpc != 0 && route.retries.attempts > 0;
  // The route timeout bounds the wait for the response header (a stream may then run on); a
  // gRPC client's own deadline (grpc-timeout) shortens it, as Envoy's max_grpc_timeout does.
  Millis limit = route.timeout;
  if (grpc_ && find_field(s.get(), "grpc-timeout", value))
    if (auto deadline = parse_grpc_timeout(value); deadline && *deadline < limit) {
      limit = *deadline;
      deadline_from_client_ = true;
    }
  const std::string_view incoming = find_field(s.get(), "traceparent", value) ? value : "";
  const std::string traceparent =
      next_traceparent(incoming, d_.env_.rng(), d_.env_.rng(), d_.env_.rng(), &entry_.trace_id);
  // The request as the upstream gets it: same pseudo-headers, the route's rewrites, our span.
  upstream_head_ = {{":method", s->method},
                    {":scheme", "http"},
                    {":authority", s->authority},
                    {":path", s->path}};
  const bool verified = view.inbound && !hmac_key_.empty();  // the signature stops here
  for (auto& f : s->fields)
    if (f.first != "traceparent" && (f.first != "te" || f.second == "trailers") &&
        !(verified && f.first == "x-weft-signature"))
      upstream_head_.push_back(std::move(f));
  s->fields.clear();
  if (!s->cookie.empty()) upstream_head_.emplace_back("cookie", std::move(s->cookie));
  rewrite(upstream_head_, route.request_headers);
  set_field(upstream_head_, "traceparent", traceparent);

  timer_.expires_after(limit);
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec || self->finished_ || self->head_received_ || self->answered_) return;
    if (self->up_ && self->up_id_ >= 0) self->up_->reset(self->up_id_);
    self->up_.reset();
    if (self->endpoint_ >= 0) self->cluster_->record(self->endpoint_, true, steady_now_ms());
    self->end_endpoint_count();
    self->answer({504,
                  self->deadline_from_client_
                      ? std::string("the client's grpc-timeout passed before the response header\n")
                      : "upstream request timeout: route " + self->route_->name + " allows " +
                            format_duration(self->route_->timeout) + " for the response header\n",
                  "UT",
                  {}});
  });
  if (fault_roll(d_.env_.rng, route.fault.delay_percent)) {
    entry_.response_flags = "DI";
    delay_.expires_after(route.fault.delay);
    delay_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (!ec && !self->finished_ && !self->answered_) self->attempt();
    });
    return;
  }
  attempt();
}

void H2Forward::attempt() {
  ++attempts_;
  endpoint_ =
      cluster_->pick_untried(hash_key_, last_endpoint_, d_.env_.rng, steady_now_ms(), tried_);
  if (endpoint_ < 0) return answer({503, "no endpoint\n", "UH", {}});
  cluster_->endpoints()[endpoint_].state->active_requests.fetch_add(1, std::memory_order_relaxed);
  endpoint_counted_ = true;
  // After a refusal, a new connection: a shared one may be as close to the app's
  // per-connection request limit as the one that refused.
  if (refusals_ == 0)
    if (auto up = d_.env_.pool.take_h2(*cluster_, endpoint_)) return send(up);
  open_connection();
}

void H2Forward::open_connection() {
  auto ready = [weak = weak_from_this()](std::shared_ptr<H2Upstream> up,
                                         const std::string& failure) {
    auto self = weak.lock();
    if (!self || self->finished_ || self->answered_) return;
    if (!up) return self->attempt_failed("connect: " + failure, true);
    self->send(up);
  };
  // One being opened already (streams arriving together): this stream rides on it too.
  if (d_.env_.pool.join_h2_connecting(*cluster_, endpoint_, ready)) return;
  if (auto r = take_connection_slot(*cluster_)) {
    end_endpoint_count();
    return answer(*r);
  }
  d_.env_.pool.open_h2(*cluster_, endpoint_, !d_.env_.draining,
                       [ready, breakers = cluster_->breakers_ptr()](std::shared_ptr<H2Upstream> up,
                                                                    const std::string& failure) {
                         breakers->pending.fetch_sub(1, std::memory_order_relaxed);
                         ready(std::move(up), failure);
                       });
}

void H2Forward::send(const std::shared_ptr<H2Upstream>& up) {
  if (!d_.view_.inbound) entry_.peer_identity = up->conn().peer_identity;
  entry_.authority = cluster_->endpoints()[endpoint_].config.authority;
  const bool has_body = !request_done_ || req_off_ < req_body_.size();
  sign(has_body);
  up_id_ = up->submit(upstream_head_, has_body, weak_from_this());
  if (up_id_ < 0) {
    // A shared connection that filled up or is going away: a new one. A new one that takes
    // no stream is a failed connect.
    if (up->active_streams() > 0) return open_connection();
    return attempt_failed("connect: the new HTTP/2 connection took no stream", true);
  }
  up_ = up;
}

void H2Forward::request_data(const uint8_t* data, size_t len) {
  entry_.bytes_received += len;
  if (answered_ || upstream_done_) {
    // Nobody will read it: credited at once so the connection's window stays open.
    nghttp2_session_consume(d_.session_, id_, len);
    return;
  }
  if (verifying_) {
    // Only what verified goes on; the frames' headers stop here, so their share of the
    // window is credited now (the payload's is as it is sent on).
    auto used = verifier_.feed({reinterpret_cast<const char*>(data), len}, req_body_);
    if (!used) return refuse_body(used.error());
    if (*used) {
      nghttp2_session_consume(d_.session_, id_, *used);
      d_.flush();
    }
  } else {
    req_body_.append(reinterpret_cast<const char*>(data), len);
  }
  if (up_ && up_id_ >= 0) up_->resume(up_id_);
}

void H2Forward::request_end() {
  // The end of the request reaches the app only after the last signed chunk.
  if (verifying_ && !answered_ && !finished_ && !upstream_done_ && !verifier_.complete())
    return refuse_body("tampered: the body ended without its last signed chunk (cut short)");
  request_done_ = true;
  if (up_ && up_id_ >= 0) up_->resume(up_id_);
}

// Inbound: the caller's signature over the request header (and, with body=chunks, the key
// its body's chunks are checked with). Tried with each of the caller's keys, as on HTTP/1.1.
bool H2Forward::admit_signature(bool end_stream) {
  const InboundTargetConfig* t = d_.view_.inbound;
  if (d_.env_.current && d_.env_.current != d_.snap_)
    if (const auto* n = d_.env_.current->config->find_target(t->authority)) t = n;
  if (t->hmac.keys.empty()) return true;
  auto s = stream();
  std::string_view header;
  find_field(s.get(), "x-weft-signature", header);
  const auto headers_of = [&s](const std::string& name) {
    std::string_view v;
    if (name == "host") return s->authority;  // HTTP/2 has :authority where Host was
    return find_field(s.get(), name, v) ? std::string(v) : std::string();
  };
  if (auto r = hmac_refusal(d_.view_, *t, header, s->method, s->path,
                            end_stream ? std::optional<std::string_view>("") : std::nullopt,
                            headers_of, &hmac_key_)) {
    answer(*r);
    return false;
  }
  signature_ = std::string(header);
  verifying_ = !end_stream;
  if (verifying_) verifier_ = ChunkVerifier(hmac_key_, signature_);
  return true;
}

void H2Forward::refuse_body(const std::string& reason) {
  const std::string why = "request signature refused: " + reason;
  verifying_ = false;
  // The app has seen the header and the chunks that verified, never the end: its stream is
  // reset.
  if (up_ && up_id_ >= 0) up_->reset(up_id_);
  up_.reset();
  up_id_ = -1;
  end_endpoint_count();
  if (!head_received_) return answer({401, why + "\n", "UAEX", {}});
  // Answered already (a stream that runs both ways): the client's stream is reset too.
  upstream_done_ = true;
  entry_.response_flags = "UAEX";
  entry_.result = why;
  if (auto s = stream()) d_.reset_stream(*s, NGHTTP2_CANCEL);
}

// Outbound: each try gets its own nonce (a retry with the first one's would be a replay).
void H2Forward::sign(bool has_body) {
  signing_ = false;
  if (d_.view_.inbound || hmac_key_.empty()) return;
  // (upstream_head_ starts :method, :scheme, :authority, :path: start() builds it so.)
  SignedRequest r{upstream_head_[0].second, upstream_head_[3].second, "", {}, has_body};
  for (const auto& name : signed_headers_) {
    const std::string_view want = name == "host" ? std::string_view(":authority") : name;
    std::string value;
    for (const auto& [n, v] : upstream_head_)
      if (n == want) {
        value = v;
        break;
      }
    r.headers.emplace_back(name, std::move(value));
  }
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  char nonce[33];
  std::snprintf(nonce, sizeof nonce, "%016llx%016llx",
                static_cast<unsigned long long>(d_.env_.rng()),
                static_cast<unsigned long long>(d_.env_.rng()));
  signature_ = sign_request(hmac_key_, r, now, nonce);
  set_field(upstream_head_, "x-weft-signature", signature_);
  signing_ = has_body;
  // The body in signed chunks is longer than the client's content-length said.
  if (signing_)
    std::erase_if(upstream_head_, [](const auto& f) { return f.first == "content-length"; });
  signer_ = ChunkSigner(hmac_key_, signature_);
  framed_.clear();
  framed_off_ = 0;
  last_framed_ = false;
}

// `n` more bytes of req_body_ went upstream.
void H2Forward::advance_body(size_t n) {
  req_off_ += n;
  if (req_off_ == req_body_.size()) {
    req_body_.clear();
    req_off_ = 0;
  }
}

// Up to `len` bytes of the body as the client sent it; *eof once it is all out.
size_t H2Forward::take_body(uint8_t* buf, size_t len, bool* eof) {
  const size_t n = std::min(len, req_body_.size() - req_off_);
  std::memcpy(buf, req_body_.data() + req_off_, n);
  advance_body(n);
  *eof = request_done_ && req_body_.empty();
  return n;
}

// The same body in signed chunks. A frame is made whole (its MAC covers its payload), then
// handed out as the upstream's window allows; `payload` is the client's bytes a new frame took.
size_t H2Forward::take_signed_body(uint8_t* buf, size_t len, bool* eof, std::string_view& payload) {
  if (framed_off_ == framed_.size()) {
    framed_.clear();
    framed_off_ = 0;
    const size_t take = std::min(kSignedChunk, req_body_.size() - req_off_);
    if (take > 0) {
      signer_.frame(std::string_view(req_body_).substr(req_off_, take), framed_);
      payload = std::string_view(framed_).substr(kChunkHeaderSize);
      advance_body(take);
    } else if (request_done_ && !last_framed_) {
      signer_.frame({}, framed_);
      last_framed_ = true;
    }
  }
  const size_t n = std::min(len, framed_.size() - framed_off_);
  std::memcpy(buf, framed_.data() + framed_off_, n);
  framed_off_ += n;
  *eof = last_framed_ && framed_off_ == framed_.size();
  return n;
}

size_t H2Forward::pull_request_body(uint8_t* buf, size_t len, bool* eof) {
  // `sent`: the client's bytes that left req_body_, kept for a replay and credited back.
  std::string_view sent;
  size_t out = 0;
  if (signing_) {
    out = take_signed_body(buf, len, eof, sent);
  } else {
    out = take_body(buf, len, eof);
    sent = {reinterpret_cast<const char*>(buf), out};
  }
  if (out == 0) return 0;
  pulled_any_ = true;
  const size_t n = sent.size();
  if (n > 0 && replayable_) {
    if (replay_.size() + n > kMaxReplay) {
      replayable_ = false;
      std::string().swap(replay_);
    } else {
      replay_.append(sent);
    }
  }
  // Sent on: the client may send as much again (a replay was credited the first time).
  const size_t fresh = n - std::min(n, already_credited_);
  already_credited_ -= n - fresh;
  if (fresh && !finished_ && !down_.expired()) {
    nghttp2_session_consume(d_.session_, id_, fresh);
    d_.flush();
  }
  return out;
}

void H2Forward::on_response_head(H2Fields fields, bool end_stream) {
  auto s = stream();
  if (finished_ || answered_ || !s) return;
  if (end_stream && retry_on_grpc_status(fields)) return;
  head_received_ = true;
  timer_.cancel();
  const unsigned status =
      fields.empty() || fields.front().first != ":status"
          ? 0
          : static_cast<unsigned>(std::strtoul(fields.front().second.c_str(), nullptr, 10));
  cluster_->record(endpoint_, status >= 500, steady_now_ms());
  rewrite(fields, route_->response_headers);
  entry_.status = status;
  d_.respond(s, fields, end_stream);
}

void H2Forward::on_response_data(const uint8_t* data, size_t len) {
  auto s = stream();
  if (finished_ || !s) return;
  s->body.append(reinterpret_cast<const char*>(data), len);
  entry_.bytes_sent += len;
  d_.resume_response(*s);
}

void H2Forward::response_sent(size_t n) {
  if (up_ && up_id_ >= 0) up_->consume(up_id_, n);
}

void H2Forward::on_response_trailers(H2Fields fields) {
  if (auto s = stream(); s && !finished_) s->trailers = std::move(fields);
}

void H2Forward::on_stream_end(uint32_t error_code) {
  if (std::exchange(ignore_stream_end_, false)) return;  // a try whose answer was retried
  auto s = stream();
  up_.reset();
  up_id_ = -1;
  if (finished_ || answered_ || !s) return;
  end_endpoint_count();
  if (!head_received_) {
    // Refused (REFUSED_STREAM, or above a GOAWAY's last stream, as an app that recycles its
    // connections sends): the upstream never saw it. Once more at once, whatever the policy,
    // as a request on a pooled HTTP/1.1 connection the app had just closed (up to 3 times:
    // each try is on a newer connection).
    if (error_code == NGHTTP2_REFUSED_STREAM && !pulled_any_ && ++refusals_ <= 3) {
      last_endpoint_ = -1;
      if (endpoint_ >= 0 && endpoint_ < 64) tried_ &= ~(1ull << endpoint_);  // it may go again
      return attempt();
    }
    cluster_->record(endpoint_, true, steady_now_ms());
    // Nothing of the request left yet (refused stream, connection lost before it was sent):
    // safe to try again, whatever the method; the body waits in req_body_ for that try.
    return attempt_failed(std::string("upstream reset before the response header: ") +
                              nghttp2_http2_strerror(error_code),
                          !pulled_any_);
  }
  upstream_done_ = true;
  if (req_off_ < req_body_.size()) {
    // The upstream is done before the whole request came: credit what it never took.
    nghttp2_session_consume(d_.session_, id_, req_body_.size() - req_off_);
    req_body_.clear();
    req_off_ = 0;
  }
  if (error_code == NGHTTP2_NO_ERROR) {
    s->response_done = true;
    return d_.resume_response(*s);
  }
  // Reset mid-response: the client sees its stream reset, with the upstream's reason.
  entry_.response_flags = "UR";
  entry_.result =
      std::string("upstream reset during the response: ") + nghttp2_http2_strerror(error_code);
  d_.reset_stream(*s, error_code);
}

void H2Forward::attempt_failed(const std::string& why, bool retryable) {
  last_endpoint_ = endpoint_;
  end_endpoint_count();
  up_.reset();
  up_id_ = -1;
  const auto& p = route_->retries;
  const bool wanted = p.on_connect_failure || p.on_reset;
  if (retryable && wanted && attempts_ <= p.attempts && cluster_->retry_allowed())
    return schedule_retry();
  answer({503,
          "upstream connect error or reset before headers (service '" + cluster_->service().name +
              "', " + std::to_string(attempts_) + " attempt" + (attempts_ > 1 ? "s" : "") +
              "): " + why + "\n",
          why.starts_with("connect") ? "UF" : "UR",
          {}});
}

void H2Forward::schedule_retry() {
  if (!in_retry_) {
    cluster_->breakers().retries.fetch_add(1, std::memory_order_relaxed);
    in_retry_ = true;
  }
  delay_.expires_after(route_->retries.backoff);
  delay_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec && !self->finished_ && !self->answered_) self->attempt();
  });
}

// A trailers-only answer (no message, just a status) whose grpc-status the route retries: the
// app did not do the call, and the whole request is still here, so it goes again (to another
// endpoint when there is one). Envoy's retry_on for gRPC.
bool H2Forward::retry_on_grpc_status(const H2Fields& fields) {
  const auto& p = route_->retries;
  if (!replayable_ || !request_done_ || attempts_ > p.attempts || !cluster_->retry_allowed())
    return false;
  int code = -1;
  for (const auto& [name, value] : fields)
    if (name == "grpc-status" && value.size() <= 2) code = std::atoi(value.c_str());
  if (code <= 0 || code > 16 || !(p.on_grpc & (1u << code))) return false;
  cluster_->record(endpoint_, code == 14, steady_now_ms());  // UNAVAILABLE: an endpoint failure
  // The request goes again from its first byte: what was sent, then what was not yet.
  already_credited_ = replay_.size();
  req_body_ = std::move(replay_) + req_body_.substr(req_off_);
  replay_.clear();
  req_off_ = 0;
  pulled_any_ = false;
  ignore_stream_end_ = true;
  last_endpoint_ = endpoint_;
  end_endpoint_count();
  up_.reset();
  up_id_ = -1;
  schedule_retry();
  return true;
}

void H2Forward::answer(const LocalReply& r) {
  auto s = stream();
  if (finished_ || answered_ || !s) return;
  answered_ = true;
  timer_.cancel();
  delay_.cancel();
  entry_.status = r.status;
  if (entry_.response_flags.empty() || r.flags != "-") entry_.response_flags = r.flags;
  entry_.result = r.body.substr(0, r.body.size() - 1);
  if (req_off_ < req_body_.size()) {
    nghttp2_session_consume(d_.session_, id_, req_body_.size() - req_off_);
    req_body_.clear();
    req_off_ = 0;
  }
  if (!grpc_) return d_.local_answer(s, static_cast<int>(r.status), r.body);
  // A gRPC client reads its status from grpc-status, not from the HTTP status: a
  // trailers-only answer it understands (the HTTP status stays for the metrics).
  d_.respond(s,
             {{":status", "200"},
              {"content-type", "application/grpc"},
              {"grpc-status", grpc_status_for(r.status)},
              {"grpc-message", grpc_message(entry_.result)},
              {"x-weft-status", std::to_string(r.status)},
              {"server", "weft"}},
             true);
}

void H2Forward::end_endpoint_count() {
  if (endpoint_counted_ && cluster_ && endpoint_ >= 0)
    cluster_->endpoints()[endpoint_].state->active_requests.fetch_sub(1, std::memory_order_relaxed);
  endpoint_counted_ = false;
}

void H2Forward::downstream_closed() {
  if (finished_) return;
  finished_ = true;
  timer_.cancel();
  delay_.cancel();
  if (up_ && up_id_ >= 0) up_->reset(up_id_);
  up_.reset();
  end_endpoint_count();
  if (request_slot_) release_request_slot(*cluster_);
  if (in_retry_) cluster_->breakers().retries.fetch_sub(1, std::memory_order_relaxed);
  request_slot_ = in_retry_ = false;
  if (entry_.status == 0) {
    entry_.response_flags = "DC";
    entry_.result = "downstream closed the stream before the response";
  }
  if (entry_.response_flags.empty()) entry_.response_flags = "-";
  entry_.attempts = attempts_;
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
          .count();
  record_request(d_.env_, d_.view_, cluster_, entry_, ms);
}

}  // namespace weft
