// Strict decoding of JSON request bodies: the body must be an object, every field must be
// known, and each must have the right type. Errors name the field, for a 400 the client can act on.
#pragma once

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/value.hpp>

#include "core/result.h"

namespace weft {

class JsonFields {
 public:
  // Parses `body`; fails on bad JSON, a non-object, or a field outside `known`.
  // `bad_field`, if given, receives the unknown field's name.
  static Result<JsonFields> parse(std::string_view body,
                                  std::initializer_list<std::string_view> known,
                                  std::string* bad_field = nullptr);

  // Missing optional fields give std::nullopt; a present field of the wrong type is an error.
  Result<std::optional<std::string>> string(std::string_view name) const;
  Result<std::optional<bool>> boolean(std::string_view name) const;
  Result<std::optional<int64_t>> integer(std::string_view name) const;
  Result<std::optional<std::vector<std::string>>> strings(std::string_view name) const;

  // The field the last error was about, for the {"field": ...} of a 400.
  const std::string& error_field() const { return error_field_; }

 private:
  boost::json::object object_;
  mutable std::string error_field_;
};

}  // namespace weft
