#include "http/http_server.h"

#include <sys/socket.h>
#include <sys/stat.h>

#include <deque>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/json.hpp>

#include "transport/tls/tls_contexts.h"

namespace weft {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

HttpResponse json_error(int status, const std::string& message, const std::string& field) {
  boost::json::object o{{"error", message}};
  if (!field.empty()) o["field"] = field;
  return {status, boost::json::serialize(o) + "\n", "application/json"};
}

std::string query_param(const std::string& query, const std::string& key) {
  size_t pos = 0;
  while (pos <= query.size()) {
    const size_t end = std::min(query.find('&', pos), query.size());
    const std::string part = query.substr(pos, end - pos);
    if (part.rfind(key + "=", 0) == 0) return part.substr(key.size() + 1);
    pos = end + 1;
  }
  return "";
}

namespace {

using unix_stream = beast::basic_stream<asio::local::stream_protocol>;
using tls_stream = beast::ssl_stream<beast::tcp_stream>;

// A slow watcher must not grow control's memory without bound: past this much unsent data the
// stream is closed, and the client resumes from its last revision on a new one.
constexpr size_t kMaxQueuedStreamBytes = 8 << 20;

template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  Session(Stream stream, HttpServer::AsyncHandler& handler, int peer_uid = -1)
      : stream_(std::move(stream)), handler_(handler), peer_uid_(peer_uid) {}

  void start() {
    if constexpr (std::is_same_v<Stream, tls_stream>) {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
      stream_.async_handshake(asio::ssl::stream_base::server,
                              [self = this->shared_from_this()](beast::error_code ec) {
                                if (!ec) self->read();
                              });
    } else {
      read();
    }
  }

  // --- chunked streams (ResponseStream) ---
  void stream_write(std::string chunk) {
    if (stream_closed_) return;
    queued_bytes_ += chunk.size();
    if (queued_bytes_ > kMaxQueuedStreamBytes) return close_stream();
    pending_.push_back(std::move(chunk));
    pump();
  }
  bool stream_closed() const { return stream_closed_; }
  void stream_end() {
    if (stream_closed_) return;
    ending_ = true;
    pump();
  }

 private:
  class Writer : public ResponseStream {
   public:
    explicit Writer(std::shared_ptr<Session> s) : session_(std::move(s)) {}
    ~Writer() override { session_->stream_end(); }
    void write(std::string chunk) override { session_->stream_write(std::move(chunk)); }
    bool closed() const override { return session_->stream_closed(); }

   private:
    std::shared_ptr<Session> session_;
  };

  void read() {
    parser_.emplace();
    parser_->body_limit(HttpServer::kMaxBody);
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(60));
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, size_t) {
                       if (ec == http::error::body_limit) {
                         return self->send(json_error(413, "request body over 1 MiB"), false);
                       }
                       if (ec == http::error::end_of_stream || ec)
                         return;  // bad HTTP or closed: drop it
                       self->respond();
                     });
  }

  void respond() {
    const auto& req = parser_->get();
    HttpRequest r;
    r.method = std::string(req.method_string());
    std::string target(req.target());
    const auto q = target.find('?');
    r.path = target.substr(0, q);
    if (q != std::string::npos) r.query = target.substr(q + 1);
    r.body = req.body();
    if (auto it = req.find(http::field::authorization); it != req.end())
      r.authorization = std::string(it->value());
    if constexpr (std::is_same_v<Stream, tls_stream>) {
      if (auto id = peer_spiffe_id(stream_.native_handle())) r.peer_spiffe_id = *id;
    }
    r.peer_uid = peer_uid_;
    r.open_stream = [weak = this->weak_from_this()](
                        int status,
                        const std::string& content_type) -> std::shared_ptr<ResponseStream> {
      auto self = weak.lock();
      if (!self) return nullptr;
      self->open_stream(status, content_type);
      return std::make_shared<Writer>(self);
    };
    // The read timer would cut a long poll; the handler's own deadline bounds the wait.
    beast::get_lowest_layer(stream_).expires_never();
    handler_(r, [self = this->shared_from_this(), keep_alive = req.keep_alive()](HttpResponse out) {
      self->send(std::move(out), keep_alive);
    });
    // A parked watch holds its session for minutes: keep nothing of the request it answered.
    parser_.reset();
  }

  void open_stream(int status, const std::string& content_type) {
    streaming_ = true;
    header_.emplace();
    header_->version(11);
    header_->result(static_cast<http::status>(status));
    header_->set(http::field::server, "weft");
    header_->set(http::field::content_type, content_type);
    header_->set(http::field::cache_control, "no-store");
    header_->chunked(true);
    serializer_.emplace(*header_);
    writing_ = true;
    http::async_write_header(stream_, *serializer_,
                             [self = this->shared_from_this()](beast::error_code ec, size_t) {
                               self->writing_ = false;
                               if (ec) return self->close_stream();
                               self->watch_for_close();
                               self->pump();
                             });
  }

  // The client sends nothing more on a stream: a read completes only when it goes away.
  void watch_for_close() {
    stream_.async_read_some(asio::buffer(discard_),
                            [self = this->shared_from_this()](beast::error_code ec, size_t) {
                              if (ec) return self->close_stream();
                              self->watch_for_close();
                            });
  }

  void pump() {
    if (writing_ || stream_closed_ || !streaming_) return;
    if (pending_.empty()) {
      if (!ending_) return;
      writing_ = true;
      asio::async_write(stream_, http::make_chunk_last(),
                        [self = this->shared_from_this()](beast::error_code, size_t) {
                          self->writing_ = false;
                          self->close_stream();
                        });
      return;
    }
    writing_ = true;
    asio::async_write(stream_, http::make_chunk(asio::buffer(pending_.front())),
                      [self = this->shared_from_this()](beast::error_code ec, size_t) {
                        self->writing_ = false;
                        self->queued_bytes_ -= self->pending_.front().size();
                        self->pending_.pop_front();
                        if (ec) return self->close_stream();
                        self->pump();
                      });
  }

  void close_stream() {
    if (stream_closed_) return;
    stream_closed_ = true;
    pending_.clear();
    queued_bytes_ = 0;
    beast::error_code ignored;
    beast::get_lowest_layer(stream_).socket().shutdown(asio::socket_base::shutdown_both, ignored);
    beast::get_lowest_layer(stream_).socket().close(ignored);
  }

  void send(HttpResponse out, bool keep_alive) {
    if (streaming_) return;  // answered with a stream already
    res_ = {};
    res_.version(11);
    res_.result(static_cast<http::status>(out.status));
    res_.set(http::field::server, "weft");
    res_.set(http::field::content_type, out.content_type);
    res_.keep_alive(keep_alive);
    res_.body() = std::move(out.body);
    res_.prepare_payload();
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
    http::async_write(stream_, res_,
                      [self = this->shared_from_this()](beast::error_code ec, size_t) {
                        if (ec) return;
                        const bool keep_alive = self->res_.keep_alive();
                        self->res_ = {};  // nor the body it sent (a full view can be large)
                        if (!keep_alive) return self->linger();
                        self->read();
                      });
  }

  // Lingering close: the client may still be sending (a body we refused with 413). Closing at
  // once would reset the connection and could destroy our answer in the client's buffer, so
  // send FIN, then read and discard for a moment.
  void linger() {
    beast::error_code ignored;
    auto& lowest = beast::get_lowest_layer(stream_);
    lowest.socket().shutdown(asio::socket_base::shutdown_send, ignored);
    lowest.expires_after(std::chrono::seconds(2));
    lowest.async_read_some(asio::buffer(discard_),
                           [self = this->shared_from_this()](beast::error_code ec, size_t) {
                             if (!ec) self->linger_more();
                           });
  }
  void linger_more() {
    beast::get_lowest_layer(stream_).async_read_some(
        asio::buffer(discard_), [self = this->shared_from_this()](beast::error_code ec, size_t) {
          if (!ec) self->linger_more();
        });
  }

  Stream stream_;
  // Where a lingering close or an open stream throws away what the client still sends. Small:
  // every parked watch holds one, and a bigger one only saves syscalls on bytes we discard.
  std::array<char, 512> discard_{};
  HttpServer::AsyncHandler& handler_;
  const int peer_uid_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
  // Streaming state.
  bool streaming_ = false, writing_ = false, ending_ = false, stream_closed_ = false;
  std::optional<http::response<http::empty_body>> header_;
  std::optional<http::response_serializer<http::empty_body>> serializer_;
  std::deque<std::string> pending_;
  size_t queued_bytes_ = 0;
};

int unix_peer_uid(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
  return static_cast<int>(cred.uid);
}

}  // namespace

struct HttpServer::Impl {
  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> tls, AsyncHandler handler)
      : acceptor(io), unix_acceptor(io), tls(std::move(tls)), handler(std::move(handler)) {}

  void accept() {
    acceptor.async_accept([this](const boost::system::error_code& ec, tcp::socket socket) {
      if (!acceptor.is_open()) return;
      if (!ec) {
        if (tls)
          std::make_shared<Session<tls_stream>>(
              tls_stream(beast::tcp_stream(std::move(socket)), *tls), handler)
              ->start();
        else
          std::make_shared<Session<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)),
                                                       handler)
              ->start();
      }
      accept();
    });
  }

  void accept_unix() {
    unix_acceptor.async_accept(
        [this](const boost::system::error_code& ec, asio::local::stream_protocol::socket socket) {
          if (!unix_acceptor.is_open()) return;
          if (!ec) {
            const int uid = unix_peer_uid(socket.native_handle());
            std::make_shared<Session<unix_stream>>(unix_stream(std::move(socket)), handler, uid)
                ->start();
          }
          accept_unix();
        });
  }

  tcp::acceptor acceptor;
  asio::local::stream_protocol::acceptor unix_acceptor;
  std::filesystem::path unix_path;
  std::shared_ptr<asio::ssl::context> tls;
  AsyncHandler handler;
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpServer::~HttpServer() { close(); }

Result<std::unique_ptr<HttpServer>> HttpServer::bind(asio::io_context& io, const HostPort& address,
                                                     std::shared_ptr<asio::ssl::context> tls,
                                                     Handler handler) {
  return bind_async(
      io, address, std::move(tls),
      [handler = std::move(handler)](const HttpRequest& r, Reply reply) { reply(handler(r)); });
}

Result<std::unique_ptr<HttpServer>> HttpServer::bind_async(asio::io_context& io,
                                                           const HostPort& address,
                                                           std::shared_ptr<asio::ssl::context> tls,
                                                           AsyncHandler handler) {
  auto impl = std::make_unique<Impl>(io, std::move(tls), std::move(handler));
  boost::system::error_code ec;
  const auto ip =
      asio::ip::make_address(address.host == "localhost" ? "127.0.0.1" : address.host, ec);
  if (ec) return make_error(address.host + " is not an IP address");
  const tcp::endpoint ep(ip, address.port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(1024, ec);
  if (ec) return make_error("cannot listen on " + address.to_string() + ": " + ec.message());
  impl->accept();
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

Result<std::unique_ptr<HttpServer>> HttpServer::bind_unix(asio::io_context& io,
                                                          const std::filesystem::path& path,
                                                          unsigned mode, AsyncHandler handler) {
  auto impl = std::make_unique<Impl>(io, nullptr, std::move(handler));
  std::error_code fs_ec;
  if (std::filesystem::is_socket(path, fs_ec)) std::filesystem::remove(path, fs_ec);
  boost::system::error_code ec;
  const asio::local::stream_protocol::endpoint ep(path.string());
  impl->unix_acceptor.open(ep.protocol(), ec);
  if (!ec) impl->unix_acceptor.bind(ep, ec);
  // Before listen(): until then nobody can connect, whatever the umask gave the file.
  if (!ec && ::chmod(path.c_str(), static_cast<mode_t>(mode)) != 0)
    ec = boost::system::error_code(errno, boost::system::system_category());
  if (!ec) impl->unix_acceptor.listen(128, ec);
  if (ec) return make_error("cannot listen on unix socket " + path.string() + ": " + ec.message());
  impl->unix_path = path;
  impl->accept_unix();
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

uint16_t HttpServer::port() const {
  boost::system::error_code ec;
  const auto ep = impl_->acceptor.local_endpoint(ec);
  return ec ? 0 : ep.port();
}

void HttpServer::close() {
  if (!impl_) return;
  boost::system::error_code ignored;
  impl_->acceptor.close(ignored);
  if (impl_->unix_acceptor.is_open()) {
    impl_->unix_acceptor.close(ignored);
    std::error_code fs_ignored;
    std::filesystem::remove(impl_->unix_path, fs_ignored);
  }
}

}  // namespace weft
