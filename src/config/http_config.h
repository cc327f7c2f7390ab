// L7 HTTP config: routes on an outbound listener with `protocol: http`, and the per-service
// policies that load balancing, health and resilience need. Same strictness as the rest of the
// proxy config: every field is checked when the file is read, so the data path never meets a
// bad value.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/duration.h"
#include "core/host_port.h"

namespace re2 {
class RE2;
}

namespace weft {

struct PathMatch {
  enum class Kind { any, exact, prefix, regex };
  Kind kind = Kind::any;
  std::string value;
  std::shared_ptr<const re2::RE2> regex;  // compiled once, when the config is read
};

struct HeaderMatch {
  std::string name;   // lower case
  std::string value;  // exact; empty with `present` set: the header only has to be there
  bool present = false;
};

struct RouteMatch {
  std::string host;  // lower case, without port; "" matches any, "*.example.com" a suffix
  PathMatch path;
  std::string method;  // "" matches any
  std::vector<HeaderMatch> headers;
};

struct WeightedBackend {
  std::string service;
  unsigned weight = 1;
};

struct HeaderRewrite {
  std::vector<std::pair<std::string, std::string>> add;  // replaces a header of the same name
  std::vector<std::string> remove;                       // lower case

  bool empty() const { return add.empty() && remove.empty(); }
};

struct RetryPolicy {
  unsigned attempts = 0;  // retries after the first try; 0: none
  bool on_connect_failure = true;
  bool on_reset = true;
  bool on_5xx = false;
  // gRPC: one bit per status code (1 << code) answered trailers-only that goes again, as
  // Envoy's retry_on cancelled / deadline-exceeded / internal / resource-exhausted /
  // unavailable. Only a request small enough to be kept whole (64 KiB) can be replayed.
  uint32_t on_grpc = 0;
  Millis backoff = std::chrono::milliseconds(25);  // base; doubles per retry, with jitter
  Millis max_backoff = std::chrono::milliseconds(250);
  // Each try's own deadline (0: none), from the try's start to the response header. Expiring
  // counts as the upstream not answering: retried when `on` has 5xx, as Envoy does.
  Millis per_try_timeout{0};
};

struct RateLimitPolicy {
  double per_second = 0;    // 0: no limit
  unsigned burst = 0;       // bucket size; 0 means per_second (at least 1)
  bool per_source = false;  // one bucket per client (address or SPIFFE ID), else one per route
};

struct FaultPolicy {
  double delay_percent = 0;
  Millis delay{0};
  double abort_percent = 0;
  unsigned abort_status = 503;
};

struct RouteConfig {
  std::string name;
  RouteMatch match;
  std::vector<WeightedBackend> backends;
  Millis timeout = std::chrono::seconds(15);  // whole request, until the response ends
  RetryPolicy retries;
  RateLimitPolicy rate_limit;
  FaultPolicy fault;
  HeaderRewrite request_headers, response_headers;
};

// One instance of a service: the peer proxy that fronts it and the target it maps the CONNECT
// authority to (Istio ambient's model: a node's proxy address plus the pod's address).
struct EndpointConfig {
  HostPort address;
  std::string authority;
  unsigned weight = 1;
  std::string locality;  // e.g. the cluster name; "" is none
  bool direct = false;   // a plain TCP connection to `address` (an inbound proxy's local app)

  std::string key() const { return address.to_string() + "/" + authority; }
};

struct CircuitBreakerConfig {
  unsigned max_connections = 1024;
  unsigned max_pending = 1024;  // requests waiting for a connection
  unsigned max_requests = 1024;
  unsigned max_retries = 1024;  // retries in flight at once (the retry budget is usually lower)
};

struct OutlierConfig {
  unsigned consecutive_errors = 5;                  // 5xx or connect failures in a row; 0: off
  Millis base_ejection = std::chrono::seconds(30);  // grows with each ejection of the endpoint
  unsigned max_ejection_percent = 50;
};

struct HealthCheckConfig {
  enum class Kind { none, tcp, http };
  Kind kind = Kind::none;
  std::string path = "/";  // http: any 2xx is healthy
  Millis interval = std::chrono::seconds(5);
  Millis timeout = std::chrono::seconds(1);
  unsigned unhealthy_threshold = 2;
  unsigned healthy_threshold = 1;
};

// HMAC request signing (Kiro's model): the outbound proxy signs, the inbound proxy verifies,
// with a key per (source, destination) pair. Keys are read from files (0600) when the config
// is read and never printed.
struct HmacSignConfig {
  std::string key;          // empty: no signing
  bool from_agent = false;  // the key comes from the agent's SDS socket (control derives it)
  std::vector<std::string> signed_headers{"host", "content-type"};
};

struct HmacVerifyConfig {
  struct Key {
    std::string source;  // SPIFFE ID pattern of the calling proxy (exact with from_agent)
    std::string key;
    bool from_agent = false;
    // The pair's key before control's last rotation, added beside the current one from the
    // agent: requests signed before the signer refreshed still verify.
    bool previous = false;
  };
  std::vector<Key> keys;  // empty: no verification
  Millis max_skew = std::chrono::minutes(5);
};

// Authorization of requests (inbound, after mTLS): deny rules first, then, if any allow rule
// exists, the request must match one. A rule matches when each of its lists is empty or
// matches (sources: SPIFFE ID patterns; methods: exact; paths: prefixes).
struct AuthzRule {
  bool allow = true;
  std::vector<std::string> sources, methods, paths;
};

struct HttpServiceConfig {
  enum class Balancer { round_robin, least_request, ring_hash };
  Balancer balancer = Balancer::round_robin;
  std::string hash_header;  // ring_hash: this header's value; "" hashes the source address
  CircuitBreakerConfig breakers;
  OutlierConfig outlier;
  HealthCheckConfig health;
  // Pooled upstream connections idle this long are closed: shorter than the app's keep-alive
  // (nginx 75 s, Node 5 s, Go 90 s) so the app never closes one we are about to reuse.
  Millis idle_timeout = std::chrono::seconds(4);
  unsigned retry_budget_percent = 20;  // retries in flight ≤ this share of active requests...
  unsigned retry_budget_min = 3;       // ...but this many are always allowed
  HmacSignConfig hmac;                 // sign requests to this service
  // protocol: http2 (or grpc) — the endpoints speak HTTP/2 (prior knowledge). Streams from
  // HTTP/2 clients are then forwarded as HTTP/2 streams, trailers and full-duplex bodies
  // included, which gRPC needs.
  bool h2 = false;
};

const char* balancer_name(HttpServiceConfig::Balancer b);

}  // namespace weft
