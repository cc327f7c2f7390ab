#include "http/json_fields.h"

#include <boost/json.hpp>

namespace weft {

Result<JsonFields> JsonFields::parse(std::string_view body,
                                     std::initializer_list<std::string_view> known,
                                     std::string* bad_field) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(body, ec);
  if (ec) return make_error("body is not valid JSON: " + ec.message());
  if (!v.is_object()) return make_error("body must be a JSON object");
  JsonFields f;
  f.object_ = std::move(v.as_object());
  for (const auto& kv : f.object_) {
    bool ok = false;
    for (auto k : known) ok = ok || k == kv.key();
    if (!ok) {
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      if (bad_field) *bad_field = kv.key();
      return make_error("unknown field '" + std::string(kv.key()) + "'; expected: " + list);
    }
  }
  return f;
}

Result<std::optional<std::string>> JsonFields::string(std::string_view name) const {
  auto it = object_.find(name);
  if (it == object_.end() || it->value().is_null()) return std::optional<std::string>();
  if (!it->value().is_string()) {
    error_field_ = name;
    return make_error("field '" + std::string(name) + "' must be a string");
  }
  return std::optional<std::string>(std::string(it->value().as_string()));
}

Result<std::optional<bool>> JsonFields::boolean(std::string_view name) const {
  auto it = object_.find(name);
  if (it == object_.end() || it->value().is_null()) return std::optional<bool>();
  if (!it->value().is_bool()) {
    error_field_ = name;
    return make_error("field '" + std::string(name) + "' must be true or false");
  }
  return std::optional<bool>(it->value().as_bool());
}

Result<std::optional<int64_t>> JsonFields::integer(std::string_view name) const {
  auto it = object_.find(name);
  if (it == object_.end() || it->value().is_null()) return std::optional<int64_t>();
  if (it->value().is_int64()) return std::optional<int64_t>(it->value().as_int64());
  if (it->value().is_uint64() && it->value().as_uint64() <= INT64_MAX)
    return std::optional<int64_t>(static_cast<int64_t>(it->value().as_uint64()));
  error_field_ = name;
  return make_error("field '" + std::string(name) + "' must be a whole number");
}

Result<std::optional<std::vector<std::string>>> JsonFields::strings(std::string_view name) const {
  auto it = object_.find(name);
  if (it == object_.end() || it->value().is_null())
    return std::optional<std::vector<std::string>>();
  std::vector<std::string> out;
  if (it->value().is_array())
    for (const auto& v : it->value().as_array()) {
      if (!v.is_string()) break;
      out.emplace_back(v.as_string());
    }
  if (!it->value().is_array() || out.size() != it->value().as_array().size()) {
    error_field_ = name;
    return make_error("field '" + std::string(name) + "' must be an array of strings");
  }
  return std::optional<std::vector<std::string>>(std::move(out));
}

}  // namespace weft
