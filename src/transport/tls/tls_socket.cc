#include "transport/tls/tls_socket.h"

#include <openssl/err.h>

#include "identity/openssl_ptr.h"

#include <boost/asio/write.hpp>

namespace weft {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

constexpr size_t kReadChunk = BufferPool::kBufferSize;
constexpr size_t kKeepSendBuffer = 1024 * 1024;

TlsSocket* owner(BIO* b) { return static_cast<TlsSocket*>(BIO_get_data(b)); }

int method_write(BIO* b, const char* in, size_t len, size_t* written) {
  return owner(b)->bio_write(in, len, written);
}
int method_read(BIO* b, char* out, size_t len, size_t* read) {
  BIO_clear_retry_flags(b);
  const int ok = owner(b)->bio_read(out, len, read);
  if (!ok) BIO_set_retry_read(b);
  return ok;
}
long method_ctrl(BIO*, int cmd, long, void*) {
  switch (cmd) {
    case BIO_CTRL_FLUSH:
    case BIO_CTRL_PUSH:
    case BIO_CTRL_POP:
      return 1;
    default:
      return 0;
  }
}
int method_create(BIO* b) {
  BIO_set_init(b, 1);
  return 1;
}

BIO_METHOD* bio_method() {
  static BIO_METHOD* m = [] {
    BIO_METHOD* bm = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "weft-tls-socket");
    BIO_meth_set_write_ex(bm, method_write);
    BIO_meth_set_read_ex(bm, method_read);
    BIO_meth_set_ctrl(bm, method_ctrl);
    BIO_meth_set_create(bm, method_create);
    return bm;
  }();
  return m;
}

std::string ssl_error_text(int ssl_error) {
  return ERR_peek_error() ? ossl::last_error() : "TLS error " + std::to_string(ssl_error);
}

}  // namespace

TlsSocket::TlsSocket(tcp::socket socket, SSL_CTX* ctx, Role role) : socket_(std::move(socket)) {
  ssl_ = SSL_new(ctx);
  BIO* bio = BIO_new(bio_method());
  BIO_set_data(bio, this);
  SSL_set_bio(ssl_, bio, bio);  // the same BIO both ways: SSL takes our one reference
  if (role == Role::client)
    SSL_set_connect_state(ssl_);
  else
    SSL_set_accept_state(ssl_);
  boost::system::error_code ignored;
  socket_.non_blocking(true, ignored);
}

TlsSocket::~TlsSocket() { SSL_free(ssl_); }

void TlsSocket::abandon_handshake() {
  auto handler = std::move(handshake_done_);
  handshake_done_ = nullptr;
  // `handler` dies here, possibly with this socket: nothing below may touch members.
}

void TlsSocket::close() {
  boost::system::error_code ignored;
  socket_.close(ignored);
}

int TlsSocket::bio_read(char* out, size_t len, size_t* read) {
  const size_t avail = in_len_ - in_off_;
  if (avail == 0) {
    *read = 0;
    return 0;
  }
  const size_t n = std::min(avail, len);
  std::memcpy(out, in_.get() + in_off_, n);
  in_off_ += n;
  if (in_off_ == in_len_) {
    in_off_ = in_len_ = 0;
    in_.reset();
  }
  *read = n;
  return 1;
}

int TlsSocket::bio_write(const char* in, size_t len, size_t* written) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(in);  // same type: a memcpy, not a loop
  out_.insert(out_.end(), bytes, bytes + len);
  *written = len;
  return 1;
}

bool TlsSocket::pull_from_socket(boost::system::error_code& ec) {
  if (!in_) in_ = BufferPool::local().take();
  if (in_off_ > 0) {  // keep the unread tail (a partial record) at the front
    std::memmove(in_.get(), in_.get() + in_off_, in_len_ - in_off_);
    in_len_ -= in_off_;
    in_off_ = 0;
  }
  if (in_len_ == kReadChunk) {
    ec = asio::error::no_buffer_space;  // cannot happen: records are at most ~16 KiB
    return false;
  }
  const size_t n = socket_.read_some(asio::buffer(in_.get() + in_len_, kReadChunk - in_len_), ec);
  in_len_ += n;
  if (ec == asio::error::eof) socket_eof_ = true;
  if (in_len_ == 0) in_.reset();
  return n > 0;
}

void TlsSocket::async_fill(Handler done) {
  socket_.async_wait(tcp::socket::wait_read, [this, done = std::move(done)](
                                                 boost::system::error_code ec) {
    if (!ec) {
      pull_from_socket(ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again || ec == asio::error::eof)
        ec = {};
    }
    done(ec);
  });
}

long TlsSocket::read(uint8_t* buf, size_t len) {
  if (eof_) return -1;
  // No ERR_clear_error() here: every error path drains the queue (ssl_error_text), so it is
  // already empty, and clearing it per record costs a measurable 1% of CPU.
  // Nothing buffered here or inside OpenSSL: SSL_read could only ask for more, after
  // allocating (SSL_MODE_RELEASE_BUFFERS) and freeing a 17 KiB record buffer to find out.
  if (in_off_ == in_len_ && !socket_eof_ && !SSL_has_pending(ssl_)) return 0;
  const int n = SSL_read(ssl_, buf, static_cast<int>(std::min<size_t>(len, INT32_MAX)));
  if (n > 0) return n;
  const int err = SSL_get_error(ssl_, n);
  if (err == SSL_ERROR_WANT_READ) {
    if (socket_eof_) {
      eof_ = true;
      error_ = "connection closed without close_notify (truncated)";
      return -1;
    }
    return 0;
  }
  eof_ = true;
  if (err != SSL_ERROR_ZERO_RETURN) error_ = ssl_error_text(err);
  return -1;
}

bool TlsSocket::write(const uint8_t* data, size_t len) {
  const int n = SSL_write(ssl_, data, static_cast<int>(len));
  if (n == static_cast<int>(len)) return true;
  error_ = ssl_error_text(SSL_get_error(ssl_, n));
  return false;
}

void TlsSocket::async_flush(Handler done) {
  sending_.clear();
  std::swap(out_, sending_);
  asio::async_write(socket_, asio::buffer(sending_),
                    [this, done = std::move(done)](boost::system::error_code ec, size_t) {
                      if (sending_.capacity() > kKeepSendBuffer)
                        std::vector<uint8_t>().swap(sending_);
                      else
                        sending_.clear();
                      done(ec);
                    });
}

void TlsSocket::async_handshake(Handler done) {
  handshake_done_ = std::move(done);
  handshake_step();
}

void TlsSocket::handshake_step() {
  ERR_clear_error();
  const int rc = SSL_do_handshake(ssl_);
  const int err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, rc);
  if (rc != 1 && err != SSL_ERROR_WANT_READ) {
    error_ = ssl_error_text(err);
    // Send our alert (bad certificate and friends) before giving up, then report.
    if (has_output()) {
      async_flush([this](const boost::system::error_code&) {
        auto done = std::move(handshake_done_);
        done(asio::error::access_denied);
      });
    } else {
      auto d = std::move(handshake_done_);
      d(asio::error::access_denied);
    }
    return;
  }
  const auto after_flush = [this, rc](const boost::system::error_code& ec) {
    if (ec) {
      error_ = "handshake write: " + ec.message();
      auto d = std::move(handshake_done_);
      return d(ec);
    }
    if (rc == 1) {
      auto d = std::move(handshake_done_);
      return d({});
    }
    if (in_len_ > in_off_) return handshake_step();
    if (socket_eof_) {
      error_ = "peer closed the connection during the handshake";
      auto d = std::move(handshake_done_);
      return d(asio::error::eof);
    }
    async_fill([this](const boost::system::error_code& ec) {
      if (ec) {
        error_ = "handshake read: " + ec.message();
        auto d = std::move(handshake_done_);
        return d(ec);
      }
      handshake_step();
    });
  };
  if (has_output())
    async_flush(after_flush);
  else
    after_flush({});
}

}  // namespace weft
