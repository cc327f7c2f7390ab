#include "proxy/sds_client.h"

#include <boost/json.hpp>

#include "http/http_client.h"

namespace weft {

namespace json = boost::json;

Result<SdsIdentity> fetch_sds_identity(const IdentityConfig& identity,
                                       const std::string& known_serial, Millis wait,
                                       const std::atomic<bool>* cancel, int* status) {
  if (status) *status = 0;
  const std::string where = "agent SDS socket " + identity.sds.string();
  HttpCall call;
  call.unix_socket = identity.sds;
  call.url = "http://sds/v1/sds/certificate?namespace=" + identity.sds_namespace +
             "&service_account=" + identity.sds_service_account;
  if (!known_serial.empty())
    call.url += "&serial=" + known_serial + "&timeout=" + std::to_string(wait.count()) + "ms";
  call.timeout = wait + std::chrono::seconds(15);  // the agent may be asking control meanwhile
  call.cancel = cancel;
  auto r = http_call(call);
  if (!r) return make_error(where + ": " + r.error() + " (is 'weft agent' running?)");
  if (status) *status = r->status;
  json::error_code ec;
  auto v = json::parse(r->body, ec);
  if (r->status != 200) {
    std::string why = r->body;
    if (!ec && v.is_object() && v.as_object().contains("error"))
      why = json::value_to<std::string>(v.at("error"));
    return make_error(where + " answered " + std::to_string(r->status) + ": " + why);
  }
  if (ec || !v.is_object()) return make_error(where + ": the answer is not a JSON object");
  SdsIdentity out;
  try {
    const auto& o = v.as_object();
    const std::string id = "ns/" + identity.sds_namespace + "/sa/" + identity.sds_service_account;
    out.material.cert_pem = json::value_to<std::string>(o.at("certificate"));
    out.material.key_pem = json::value_to<std::string>(o.at("private_key"));
    out.material.ca_pem = json::value_to<std::string>(o.at("ca_bundle"));
    out.serial = json::value_to<std::string>(o.at("serial"));
    out.material.cert_name = "from " + where + " for " + id;
    out.material.key_name = "from " + where + " for " + id;
    out.material.ca_name = "from " + where;
  } catch (const std::exception& e) {
    return make_error(where + ": the answer lacks a field: " + e.what());
  }
  return out;
}

Result<SdsServices> fetch_sds_services(const IdentityConfig& identity,
                                       const std::string& known_revision, Millis wait,
                                       const std::atomic<bool>* cancel) {
  const std::string where = "agent SDS socket " + identity.sds.string();
  HttpCall call;
  call.unix_socket = identity.sds;
  call.url = "http://sds/v1/sds/services";
  if (!known_revision.empty())
    call.url += "?revision=" + known_revision + "&timeout=" + std::to_string(wait.count()) + "ms";
  call.timeout = wait + std::chrono::seconds(5);
  call.cancel = cancel;
  auto r = http_call(call);
  if (!r) return make_error(where + ": " + r.error());
  if (r->status != 200)
    return make_error(where + " answered " + std::to_string(r->status) + ": " + r->body);
  SdsServices out;
  try {
    const auto v = json::parse(r->body);
    out.revision = std::to_string(v.at("revision").as_int64());
    for (const auto& s : v.at("services").as_array()) {
      ServiceConfig c;
      c.name = json::value_to<std::string>(s.at("name"));
      c.authority = json::value_to<std::string>(s.at("authority"));
      for (const auto& a : s.at("addresses").as_array()) {
        auto hp = parse_host_port(json::value_to<std::string>(a));
        if (!hp) throw std::runtime_error("service " + c.name + ": " + hp.error());
        c.addresses.push_back(*hp);
        c.endpoints.push_back({*hp, c.authority, 1, ""});
      }
      for (const auto& id : s.at("spiffe_ids").as_array())
        c.spiffe_ids.push_back(json::value_to<std::string>(id));
      out.services.push_back(std::move(c));
    }
  } catch (const std::exception& e) {
    return make_error(where + ": a bad services answer: " + e.what());
  }
  return out;
}

Result<SdsPairKey> fetch_sds_pair_key(const IdentityConfig& identity, const std::string& source,
                                      const std::string& destination) {
  const std::string where = "agent SDS socket " + identity.sds.string();
  HttpCall call;
  call.unix_socket = identity.sds;
  call.url = "http://sds/v1/sds/hmac-key?source=" + source + "&destination=" + destination;
  call.timeout = std::chrono::seconds(15);
  auto r = http_call(call);
  if (!r) return make_error(where + ": " + r.error() + " (is 'weft agent' running?)");
  json::error_code ec;
  auto v = json::parse(r->body, ec);
  if (ec || !v.is_object()) return make_error(where + ": the answer is not a JSON object");
  const auto& o = v.as_object();
  if (r->status != 200)
    return make_error(where + " answered " + std::to_string(r->status) + ": " +
                      (o.contains("error") && o.at("error").is_string()
                           ? std::string(o.at("error").as_string())
                           : r->body));
  if (!o.contains("key") || !o.at("key").is_string() || o.at("key").as_string().size() < 16)
    return make_error(where + ": no key in the answer");
  SdsPairKey out{std::string(o.at("key").as_string()), {}, false};
  if (const auto* p = o.if_contains("previous_key"); p && p->is_string())
    out.previous = std::string(p->as_string());
  if (const auto* s = o.if_contains("sign_with_previous"); s && s->is_bool())
    out.sign_with_previous = s->as_bool();
  return out;
}

}  // namespace weft
