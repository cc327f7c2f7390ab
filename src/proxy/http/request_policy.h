// The per-request checks and accounting that every L7 path shares, whether a request came as
// HTTP/1.1 (HttpSession) or stays an HTTP/2 stream end to end (H2Downstream's forwarded
// streams): admission by rate limit, authorization and the max_requests breaker, and the Istio
// metrics plus access-log line of a finished request. Each check returns the local reply to
// send, or nothing when the request may go on.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "proxy/http/cluster.h"
#include "proxy/http/http_session.h"

namespace weft {

struct LocalReply {
  unsigned status = 0;
  std::string body;        // one line, ends in "\n"
  std::string flags;       // Envoy-style response flags for the access log
  std::string overloaded;  // x-weft-overloaded: which breaker tripped, if one did
};

// Inbound: the calling identity's token bucket (429).
std::optional<LocalReply> inbound_rate_limited(const HttpListenerView& listener, SteadyMillis now);

// Inbound: the request's x-weft-signature `header`, checked with each key `target` (the
// newest config of the listener's target) holds for the caller: after a rotation, the current
// one and the one before. `body`: nullopt for an HTTP/2 stream whose body follows
// (hmac_signing.h). `key`, if given, gets the key that verified. A 401 when refused.
std::optional<LocalReply> hmac_refusal(
    const HttpListenerView& listener, const InboundTargetConfig& target, std::string_view header,
    std::string_view method, std::string_view path_and_query, std::optional<std::string_view> body,
    const std::function<std::string(const std::string&)>& headers_of, std::string* key);

// Inbound: deny rules first; then, if there are allow rules, one must match (403).
std::optional<LocalReply> authorization_refusal(const HttpListenerView& listener,
                                                std::string_view method, std::string_view path);

// The route's token bucket, per source when the route says so (429).
std::optional<LocalReply> route_rate_limited(const HttpRuntime& http, const std::string& listener,
                                             const RouteConfig& route, const std::string& source,
                                             SteadyMillis now);

// Takes a slot of the service's max_requests breaker (release with release_request()), or
// answers 503 naming the breaker.
std::optional<LocalReply> take_request_slot(const Cluster& cluster);
void release_request_slot(const Cluster& cluster);

// Before a new upstream connection is opened: the max_connections and max_pending breakers
// (503 naming the one that is open), else one pending slot is taken (the open's callback
// gives it back).
std::optional<LocalReply> take_connection_slot(const Cluster& cluster);

// Whether an injected fault fires this time: `percent` of calls, at 0.0001 % resolution.
bool fault_roll(std::mt19937_64& rng, double percent);

// Istio's request metrics and the access-log line for one finished request; `entry` carries
// status, flags, bytes and identities.
void record_request(HttpWorkerEnv& env, const HttpListenerView& listener, const Cluster* cluster,
                    const AccessLogEntry& entry, double duration_ms);

// A gRPC client's deadline, `grpc-timeout: 1*8DIGIT unit` (H M S m u n), rounded up to whole
// milliseconds; nullopt when malformed (the header is then ignored, as gRPC servers do).
std::optional<Millis> parse_grpc_timeout(std::string_view value);

}  // namespace weft
