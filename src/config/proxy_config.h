// The static YAML config of `weft proxy` (the architecture's "local mode"). Parsing is strict:
// unknown fields, wrong types and dangling references are errors that name file:line, the field
// and what to write instead. A ProxyConfig that exists is valid.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/value.hpp>

#include "config/http_config.h"
#include "core/duration.h"
#include "core/host_port.h"

namespace weft {

struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Files (cert, key, ca), or the local agent's SDS socket, which hands over the certificate of
// the workload identity ns/<namespace>/sa/<service_account> and rotates it: a sidecar then
// holds no control-plane credential and no key on disk.
struct IdentityConfig {
  std::filesystem::path cert;
  std::filesystem::path key;
  std::filesystem::path ca;
  std::string trust_domain;  // empty: taken from the certificate's SPIFFE ID
  std::filesystem::path sds;
  std::string sds_namespace, sds_service_account;

  bool from_sds() const { return !sds.empty(); }
  bool operator==(const IdentityConfig&) const = default;
};

// A service reachable over HBONE: the peer proxies that front it and who they must be.
struct ServiceConfig {
  std::string name;
  std::vector<HostPort> addresses;      // peer proxies' HBONE listeners, tried in order
  std::string authority;                // CONNECT :authority, the target the peer maps locally
  std::vector<std::string> spiffe_ids;  // accepted server identities (exact match)
  // What applications dial that means this service, for captured traffic: "10.96.0.10:80"
  // matches an original destination, "reviews.default.svc:80" a Host, SNI or SOCKS/CONNECT name.
  std::vector<HostPort> destinations;
  // The instances, for L7 load balancing: from `endpoints`, or one per address with `authority`.
  std::vector<EndpointConfig> endpoints;
  HttpServiceConfig http;  // balancing, breakers, outlier detection, health checks
};

// Capture: the transparent listener iptables REDIRECTs to, and the explicit SOCKS5 / HTTP
// proxy. Each captured connection is routed by name (SNI, Host, the proxy request) or by its
// original destination to a mesh service, or else out of the mesh if egress allows.
struct CaptureConfig {
  std::optional<HostPort> transparent;     // e.g. 127.0.0.1:15001
  std::optional<HostPort> explicit_proxy;  // e.g. 127.0.0.1:15080 (SOCKS5 and HTTP)
  // Inbound capture (iptables PREROUTING → 15006): plain TCP from outside the mesh to this
  // workload. Mesh traffic arrives over HBONE (15008, never captured); plaintext is refused
  // unless allowed, as Istio's STRICT and PERMISSIVE modes.
  std::optional<HostPort> inbound;
  bool inbound_plaintext_allowed = false;
  Millis detect_timeout = std::chrono::milliseconds(10);
  std::vector<uint16_t> opaque_ports;  // never sniffed: server-first protocols, databases
  bool egress_allowed = true;          // destinations that are no mesh service
  struct User {
    std::string name, password;
  };
  std::vector<User> users;  // SOCKS5 username/password; empty: no authentication (loopback only)
  Millis handshake_timeout = std::chrono::seconds(10);  // explicit proxy handshakes
};

struct OutboundListenerConfig {
  std::string name;
  HostPort listen;
  std::string service;  // tcp: where every connection goes; http: the default route's backend
  // http: requests are parsed (HTTP/1.1), routed, balanced over endpoints and retried; else
  // each connection is one opaque HBONE stream.
  bool http = false;
  std::vector<RouteConfig> routes;  // first match wins; a default route to `service` ends the list
  size_t max_request_body = 1024 * 1024;  // buffered for retries and signing; larger: 413
};

struct InboundTargetConfig {
  std::string authority;           // as sent in CONNECT :authority
  HostPort address;                // the local address it maps to
  std::vector<std::string> allow;  // SPIFFE IDs; empty means any ID of our trust domain
  std::vector<std::string> deny;   // checked first
  // protocol: http — requests are parsed here too: HMAC verified, authorized by method and
  // path, rate limited per calling identity, counted with reporter="destination".
  bool http = false;
  // protocol: http2 (or grpc) — L7 as with http, and the app speaks HTTP/2 (prior knowledge):
  // HTTP/2 streams reach it as HTTP/2 streams (gRPC).
  bool app_h2 = false;
  HmacVerifyConfig hmac;
  std::vector<AuthzRule> authz;
  RateLimitPolicy rate_limit;  // per source identity
  size_t max_request_body = 1024 * 1024;
};

struct InboundConfig {
  bool enabled = false;
  HostPort listen{"0.0.0.0", 15008};
  std::vector<InboundTargetConfig> targets;
};

struct L4ListenerConfig {
  std::string name;
  HostPort listen;
  HostPort upstream;
};

struct PoolConfig {
  unsigned max_streams = 100;
  Millis idle_timeout = std::chrono::seconds(60);
  Millis connect_timeout = std::chrono::seconds(5);
};

struct ProxyConfig {
  std::filesystem::path source;
  IdentityConfig identity;
  unsigned workers = 0;  // 0: one per core
  HostPort admin{"127.0.0.1", 15000};
  std::string locality;  // this proxy's cluster: L7 prefers endpoints with the same locality
  Millis drain_timeout = std::chrono::seconds(15);
  Millis cert_check_interval = std::chrono::seconds(1);
  std::string access_log = "stdout";  // "stdout", "off" or a file path
  std::vector<ServiceConfig> services;
  std::vector<OutboundListenerConfig> outbound;
  InboundConfig inbound;
  std::vector<L4ListenerConfig> l4;
  CaptureConfig capture;
  PoolConfig pool;
  // Mesh services come from the agent's SDS socket too, merged under those of this file.
  bool services_from_agent = false;

  bool captures() const { return capture.transparent || capture.explicit_proxy || capture.inbound; }
  bool needs_identity() const {
    return inbound.enabled || !outbound.empty() || (captures() && !services.empty());
  }
  const ServiceConfig* find_service(std::string_view name) const;
  const InboundTargetConfig* find_target(std::string_view authority) const;
  boost::json::value to_json() const;
};

// Throws ConfigError. `source` names the file in messages; relative paths resolve against `base`.
ProxyConfig parse_proxy_config(std::string_view yaml, const std::string& source,
                               const std::filesystem::path& base);
ProxyConfig load_proxy_config(const std::filesystem::path& file);

}  // namespace weft
