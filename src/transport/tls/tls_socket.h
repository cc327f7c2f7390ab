// TlsSocket: TLS over a non-blocking TCP socket with OpenSSL driving a custom in-memory BIO.
//
// Why not asio::ssl::stream: it moves ciphertext through 17 KiB buffers, so every TLS record
// costs a read or write syscall and loopback TCP sees 16 KiB segments. Here ciphertext gathers
// in a growable buffer and goes out in one write of up to hundreds of KiB, and the read side
// pulls up to 256 KiB per syscall. It lives on one worker thread, like the connection using it.
#pragma once

#include <openssl/ssl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

#include "core/buffer_pool.h"

namespace weft {

class TlsSocket {
 public:
  enum class Role { client, server };
  using Handler = std::function<void(const boost::system::error_code&)>;

  TlsSocket(boost::asio::ip::tcp::socket socket, SSL_CTX* ctx, Role role);
  ~TlsSocket();
  TlsSocket(const TlsSocket&) = delete;
  TlsSocket& operator=(const TlsSocket&) = delete;

  // Runs the handshake to completion. On failure, `error()` says why (OpenSSL's words).
  void async_handshake(Handler done);

  // Decrypts what is already buffered into `buf`. Returns bytes (> 0), 0 when more ciphertext
  // is needed (call async_fill), or -1 when the peer closed or the stream failed (see eof()).
  long read(uint8_t* buf, size_t len);
  // Waits until the socket is readable and pulls ciphertext in; then call read() again.
  void async_fill(Handler done);

  // Encrypts `data` into the send buffer (it is not kept); call flush to send it.
  bool write(const uint8_t* data, size_t len);
  bool has_output() const { return !out_.empty(); }
  // Sends all buffered ciphertext; `done` runs once it is on the socket.
  void async_flush(Handler done);

  SSL* native_handle() { return ssl_; }
  boost::asio::ip::tcp::socket& socket() { return socket_; }
  bool eof() const { return eof_; }
  const std::string& error() const { return error_; }
  void close();
  // At shutdown: drops a pending handshake's handler without calling it. The handler may own
  // this socket (and so the socket itself), which would otherwise never be freed.
  void abandon_handshake();

  // --- BIO callbacks ---
  int bio_read(char* out, size_t len, size_t* read);
  int bio_write(const char* in, size_t len, size_t* written);

 private:
  void handshake_step();
  bool pull_from_socket(boost::system::error_code& ec);

  boost::asio::ip::tcp::socket socket_;
  SSL* ssl_ = nullptr;
  // Ciphertext received, [in_off_, in_len_) not yet given to OpenSSL. Pooled, and given back
  // whenever it drains, so an idle connection holds no read buffer.
  BufferPool::Buffer in_;
  size_t in_off_ = 0, in_len_ = 0;
  std::vector<uint8_t> out_;      // ciphertext waiting to be sent
  std::vector<uint8_t> sending_;  // ciphertext on the wire now
  bool eof_ = false;
  bool socket_eof_ = false;
  std::string error_;
  Handler handshake_done_;
};

}  // namespace weft
