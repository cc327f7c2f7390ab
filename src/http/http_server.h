// A small HTTP/1.1 server (Boost.Beast) for the control-plane and agent REST APIs: optional
// TLS with optional client certificates, a body limit (413), and one handler per request.
// It also listens on Unix sockets (the agent's SDS socket), where the peer's uid is the
// credential. Runs on the io_context it is given; handlers are called on that thread.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>

#include "core/host_port.h"
#include "core/result.h"

namespace weft {

// A response sent as a chunked stream that stays open (a watch stream). Writing is queued;
// dropping the last reference ends the response and closes the connection. Use it on the
// server's io_context thread only.
class ResponseStream {
 public:
  virtual ~ResponseStream() = default;
  virtual void write(std::string chunk) = 0;
  // The client went away, a write failed, or it stopped reading (too much queued).
  virtual bool closed() const = 0;
};

struct HttpRequest {
  std::string method;
  std::string path;
  std::string query;
  std::string body;
  std::string authorization;   // the Authorization header, if any
  std::string peer_spiffe_id;  // verified client certificate's SPIFFE ID (TLS only)
  int peer_uid = -1;           // the connecting process's uid (Unix sockets only)
  // Answers with a chunked stream instead of the reply; called at most once, then the reply
  // must not be called.
  std::function<std::shared_ptr<ResponseStream>(int status, const std::string& content_type)>
      open_stream;
};

struct HttpResponse {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
};

class HttpServer {
 public:
  using Handler = std::function<HttpResponse(const HttpRequest&)>;
  // For answers that wait (a watch's long poll): call the reply once, later, on the same thread.
  using Reply = std::function<void(HttpResponse)>;
  using AsyncHandler = std::function<void(const HttpRequest&, Reply)>;
  static constexpr size_t kMaxBody = 1024 * 1024;

  // tls == nullptr serves plain HTTP.
  static Result<std::unique_ptr<HttpServer>> bind(boost::asio::io_context& io,
                                                  const HostPort& address,
                                                  std::shared_ptr<boost::asio::ssl::context> tls,
                                                  Handler handler);
  static Result<std::unique_ptr<HttpServer>> bind_async(
      boost::asio::io_context& io, const HostPort& address,
      std::shared_ptr<boost::asio::ssl::context> tls, AsyncHandler handler);
  // A Unix socket at `path` (a stale socket file is replaced), created with `mode`.
  static Result<std::unique_ptr<HttpServer>> bind_unix(boost::asio::io_context& io,
                                                       const std::filesystem::path& path,
                                                       unsigned mode, AsyncHandler handler);
  ~HttpServer();
  uint16_t port() const;  // 0 for a Unix socket
  void close();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The value of `key` in a query string ("a=1&b=2"), or "" (values here are names and numbers;
// no percent-decoding).
std::string query_param(const std::string& query, const std::string& key);

// {"error": message, "field": field} with the given status.
HttpResponse json_error(int status, const std::string& message, const std::string& field = {});

}  // namespace weft
