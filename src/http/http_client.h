// A blocking HTTP(S) client for control-plane calls made off the data path (agent registration,
// CLI commands). TLS verifies the server against a CA bundle (the mesh CA), not a host name:
// mesh identities are SPIFFE URIs.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <string>

#include "core/result.h"

namespace weft {

struct HttpCallResult {
  int status = 0;
  std::string body;
};

struct HttpCall {
  std::string url;  // http://host:port/path or https://host:port/path
  std::string method = "GET";
  std::string body;
  std::string bearer;
  std::filesystem::path ca_file;    // required for https
  std::filesystem::path cert_file;  // optional client certificate (mTLS), with key_file
  std::filesystem::path key_file;
  std::filesystem::path unix_socket;          // if set, connect here; the URL gives only the path
  std::chrono::milliseconds timeout{5000};    // the whole call: connect, handshake, exchange
  const std::atomic<bool>* cancel = nullptr;  // checked every 50 ms: a long poll ends at shutdown
};

Result<HttpCallResult> http_call(const HttpCall& call);

}  // namespace weft
