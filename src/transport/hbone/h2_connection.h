// H2Connection: one HBONE connection, HTTP/2 (nghttp2) over TLS 1.3, carrying many CONNECT
// streams. nghttp2 does no I/O; this class feeds it what TLS reads and writes what it emits,
// with one read and one write in flight. It lives on one worker thread.
//
// Client role (outbound): submit_connect() opens a stream per app connection.
// Server role (inbound): each CONNECT request goes to Hooks::on_connect, which authorizes it and
// returns a TunnelStream (answered later with accept_stream/reject_stream) or a status to send.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/steady_timer.hpp>

#include "core/duration.h"
#include "stats/metrics.h"
#include "transport/tls/tls_socket.h"

struct nghttp2_session;

namespace weft {

class TunnelStream;

class H2Connection : public std::enable_shared_from_this<H2Connection> {
 public:
  enum class Role { client, server };
  using Tls = TlsSocket;

  struct ConnectDecision {
    int status = 0;                        // non-zero: answer this now and end the stream
    std::shared_ptr<TunnelStream> stream;  // else: the stream to attach (answered later)
  };

  struct Hooks {
    std::function<ConnectDecision(const std::shared_ptr<H2Connection>&, int32_t stream_id,
                                  const std::string& authority)>
        on_connect;                                // server role
    std::function<void(H2Connection*)> on_closed;  // the connection is gone
  };

  struct Settings {
    uint32_t max_concurrent_streams = 100;
    uint32_t stream_window = 4 * 1024 * 1024;
    uint32_t connection_window = 16 * 1024 * 1024;
    uint32_t max_frame_size = 64 * 1024;  // what we accept; fewer, larger DATA frames
    Millis idle_timeout{0};               // 0: never close for idleness
  };

  H2Connection(Role role, std::unique_ptr<Tls> tls, std::string peer_identity, Metrics& metrics,
               Hooks hooks, Settings settings);
  ~H2Connection();

  // Sends our SETTINGS and starts reading. Call after the TLS handshake.
  void start();

  // Client role: opens a CONNECT stream. Returns false when the connection cannot take it.
  bool submit_connect(const std::string& authority, const std::shared_ptr<TunnelStream>& stream);

  // Server role: answers a pending CONNECT.
  void accept_stream(int32_t stream_id);
  void reject_stream(int32_t stream_id, int status);

  // Called by streams.
  void resume(int32_t stream_id);
  void consume(int32_t stream_id, size_t n);
  void reset(int32_t stream_id, uint32_t error_code);

  // Stops new streams (GOAWAY when serving); closes once the last stream ends.
  void retire();
  // At exit, after the worker's thread stopped: closes at once and fails the open streams.
  // Streams and their connection hold each other; this breaks that cycle so both are freed.
  void shutdown() { terminate("shutdown"); }
  bool accepting_streams() const;
  size_t stream_count() const { return streams_.size(); }
  const std::string& peer_identity() const { return peer_identity_; }

  // --- nghttp2 callback targets (public for the C trampolines only) ---
  int on_begin_headers(int32_t stream_id);
  int on_header(int32_t stream_id, std::string_view name, std::string_view value);
  int on_frame_recv(int32_t stream_id, uint8_t type, uint8_t flags, int headers_category);
  int on_data_chunk(int32_t stream_id, const uint8_t* data, size_t len);
  int on_stream_close(int32_t stream_id, uint32_t error_code);
  void on_protocol_error(const char* what);

 private:
  struct PendingHeaders {
    std::string method, authority, status, scheme, path, protocol;
  };

  void flush();
  void do_read();
  void on_read_error();
  void terminate(const std::string& why);
  void update_idle_timer();
  std::shared_ptr<TunnelStream> find(int32_t stream_id);

  Role role_;
  std::unique_ptr<Tls> tls_;
  std::string peer_identity_;
  Metrics& metrics_;
  Hooks hooks_;
  Settings settings_;
  nghttp2_session* session_ = nullptr;

  std::map<int32_t, std::shared_ptr<TunnelStream>> streams_;
  std::map<int32_t, PendingHeaders> headers_;
  std::unique_ptr<uint8_t[]> in_;
  boost::asio::steady_timer idle_timer_;
  bool writing_ = false;
  bool in_nghttp2_ = false;
  bool retired_ = false;
  bool closed_ = false;
};

}  // namespace weft
