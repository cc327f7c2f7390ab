#include "transport/quic/quic_tunnel.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/write.hpp>

namespace weft::quic {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {
constexpr size_t kMaxAuthority = 255;
constexpr size_t kReadSize = 64 * 1024;
// Application error codes on a stream reset.
constexpr uint64_t kAbort = 0x1;
}  // namespace

std::vector<uint8_t> encode_request(const std::string& authority) {
  std::vector<uint8_t> out{static_cast<uint8_t>(authority.size() >> 8),
                           static_cast<uint8_t>(authority.size())};
  out.insert(out.end(), authority.begin(), authority.end());
  return out;
}

std::vector<uint8_t> encode_response(int status, const std::string& reason) {
  const std::string r = reason.substr(0, 255);
  std::vector<uint8_t> out{static_cast<uint8_t>(status >> 8), static_cast<uint8_t>(status),
                           static_cast<uint8_t>(r.size())};
  out.insert(out.end(), r.begin(), r.end());
  return out;
}

Result<std::optional<TunnelRequest>> parse_request(const uint8_t* buf, size_t len, size_t& used) {
  if (len < 2) return std::optional<TunnelRequest>();
  const size_t n = (size_t{buf[0]} << 8) | buf[1];
  if (n == 0 || n > kMaxAuthority)
    return make_error("tunnel request: authority length " + std::to_string(n) +
                      " is outside 1-255");
  if (len < 2 + n) return std::optional<TunnelRequest>();
  TunnelRequest req{std::string(reinterpret_cast<const char*>(buf + 2), n)};
  for (unsigned char c : req.authority)
    if (c <= 0x20 || c >= 0x7f)
      return make_error("tunnel request: the authority has a control, space or non-ASCII byte");
  used = 2 + n;
  return std::optional<TunnelRequest>(std::move(req));
}

Result<std::optional<TunnelResponse>> parse_response(const uint8_t* buf, size_t len, size_t& used) {
  if (len < 3) return std::optional<TunnelResponse>();
  const int status = (int{buf[0]} << 8) | buf[1];
  if (status < 100 || status > 599)
    return make_error("tunnel response: status " + std::to_string(status) + " is not HTTP's");
  const size_t n = buf[2];
  if (len < 3 + n) return std::optional<TunnelResponse>();
  used = 3 + n;
  return std::optional<TunnelResponse>(
      TunnelResponse{status, std::string(reinterpret_cast<const char*>(buf + 3), n)});
}

QuicTunnel::QuicTunnel(std::shared_ptr<Connection> conn, tcp::socket socket, bool opener)
    : conn_(std::move(conn)), socket_(std::move(socket)), opener_(opener) {}

QuicTunnel::~QuicTunnel() = default;

std::shared_ptr<QuicTunnel> QuicTunnel::open(std::shared_ptr<Connection> conn, tcp::socket socket,
                                             const std::string& authority, Finished finished) {
  std::shared_ptr<QuicTunnel> t(new QuicTunnel(conn, std::move(socket), true));
  t->stream_ = conn->open_stream(t.get());
  if (t->stream_ < 0) return nullptr;
  t->self_ = t;
  t->authority_ = authority;
  t->finished_ = std::move(finished);
  const auto req = encode_request(authority);
  conn->write(t->stream_, req.data(), req.size());
  // The app's first bytes go right behind the request.
  t->arm_tcp_read();
  return t;
}

std::shared_ptr<QuicTunnel> QuicTunnel::accept(asio::io_context& io,
                                               std::shared_ptr<Connection> conn, int64_t stream,
                                               Authorize authorize, Finished finished) {
  std::shared_ptr<QuicTunnel> t(new QuicTunnel(std::move(conn), tcp::socket(io), false));
  t->stream_ = stream;
  t->self_ = t;
  t->authorize_ = std::move(authorize);
  t->finished_ = std::move(finished);
  return t;
}

void QuicTunnel::on_data(const uint8_t* data, size_t len) {
  if (state_ == State::done) return;
  if (state_ == State::awaiting_header) {
    header_.insert(header_.end(), data, data + len);
    size_t used = 0;
    if (opener_) {
      auto res = parse_response(header_.data(), header_.size(), used);
      if (!res) return finish(res.error(), true);
      if (!*res) return;
      conn_->consume(stream_, used);
      if ((*res)->status != 200) {
        header_.erase(header_.begin(), header_.begin() + static_cast<long>(used));
        return finish(
            "refused by the peer: " + std::to_string((*res)->status) + " " + (*res)->reason, true);
      }
      state_ = State::relaying;
    } else {
      auto res = parse_request(header_.data(), header_.size(), used);
      if (!res) {
        const auto resp = encode_response(400, res.error());
        conn_->write(stream_, resp.data(), resp.size());
        conn_->shutdown_write(stream_);
        return finish("bad tunnel request: " + res.error(), false);
      }
      if (!*res) return;
      conn_->consume(stream_, used);
      authority_ = (*res)->authority;
    }
    // Whatever followed the header is payload.
    pending_.insert(pending_.end(), header_.begin() + static_cast<long>(used), header_.end());
    header_.clear();
    header_.shrink_to_fit();
    if (!opener_) return on_request(TunnelRequest{authority_});
    write_to_tcp();
    return;
  }
  pending_.insert(pending_.end(), data, data + len);
  if (state_ == State::relaying) write_to_tcp();
}

void QuicTunnel::on_request(const TunnelRequest& req) {
  const TunnelVerdict v = authorize_(conn_->peer_identity(), req.authority);
  if (v.status != 200) {
    const auto resp = encode_response(v.status, v.reason);
    conn_->write(stream_, resp.data(), resp.size());
    conn_->shutdown_write(stream_);
    return finish("refused " + req.authority + ": " + std::to_string(v.status) + " " + v.reason,
                  false);
  }
  state_ = State::connecting;
  target_ = v.target.to_string();
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(v.target.host, ec);
  if (!ec) return connect_target({tcp::endpoint(ip, v.target.port)}, v.target.to_string());
  // A resource's target may be a name (an export of `db.internal:5432`).
  auto resolver = std::make_shared<tcp::resolver>(socket_.get_executor());
  resolver->async_resolve(
      v.target.host, std::to_string(v.target.port),
      [self = shared_from_this(), resolver, target = v.target.to_string()](
          const boost::system::error_code& ec, const tcp::resolver::results_type& results) {
        if (self->state_ == State::done) return;
        if (ec) return self->refuse_connect(target, "cannot resolve: " + ec.message());
        self->connect_target(std::vector<tcp::endpoint>(results.begin(), results.end()), target);
      });
}

void QuicTunnel::refuse_connect(const std::string& target, const std::string& why) {
  const auto resp = encode_response(503, "cannot connect to " + target + ": " + why);
  conn_->write(stream_, resp.data(), resp.size());
  conn_->shutdown_write(stream_);
  finish("upstream_connect_failed: " + why, false);
}

void QuicTunnel::connect_target(std::vector<tcp::endpoint> endpoints, const std::string& target) {
  asio::async_connect(socket_, endpoints,
                      [self = shared_from_this(), target](const boost::system::error_code& ec,
                                                          const tcp::endpoint&) {
                        if (self->state_ == State::done) return;
                        if (ec) return self->refuse_connect(target, ec.message());
                        boost::system::error_code ignored;
                        self->socket_.set_option(tcp::no_delay(true), ignored);
                        const auto resp = encode_response(200, "");
                        self->conn_->write(self->stream_, resp.data(), resp.size());
                        self->start_relay();
                      });
}

void QuicTunnel::start_relay() {
  state_ = State::relaying;
  write_to_tcp();
  arm_tcp_read();
}

void QuicTunnel::arm_tcp_read() {
  if (reading_ || tcp_eof_ || state_ == State::done || roff_ < rlen_) return;
  if (conn_->room(stream_) == 0) return;  // on_writable() comes back here
  if (rbuf_.empty()) rbuf_.resize(kReadSize);
  reading_ = true;
  socket_.async_read_some(asio::buffer(rbuf_), [self = shared_from_this()](
                                                   const boost::system::error_code& ec, size_t n) {
    self->reading_ = false;
    if (self->state_ == State::done) return;
    if (ec) {
      if (ec != asio::error::eof) return self->finish("downstream_error: " + ec.message(), true);
      self->tcp_eof_ = true;
      self->pump_tcp_to_stream();
      return;
    }
    self->rlen_ = n;
    self->roff_ = 0;
    self->from_tcp_ += n;
    self->pump_tcp_to_stream();
  });
}

void QuicTunnel::pump_tcp_to_stream() {
  if (state_ == State::done) return;
  if (roff_ < rlen_) roff_ += conn_->write(stream_, rbuf_.data() + roff_, rlen_ - roff_);
  if (roff_ < rlen_) return;  // wait for room
  rlen_ = roff_ = 0;
  if (tcp_eof_) {
    if (!fin_sent_) {
      fin_sent_ = true;
      conn_->shutdown_write(stream_);
    }
    return maybe_finish();
  }
  arm_tcp_read();
}

void QuicTunnel::on_writable() {
  if (state_ == State::done) return;
  if (roff_ < rlen_ || tcp_eof_)
    pump_tcp_to_stream();
  else
    arm_tcp_read();
}

void QuicTunnel::write_to_tcp() {
  if (writing_ || state_ == State::done) return;
  if (pending_.empty()) {
    if (stream_fin_ && !tcp_shut_) {
      tcp_shut_ = true;
      boost::system::error_code ignored;
      socket_.shutdown(tcp::socket::shutdown_send, ignored);
      maybe_finish();
    }
    return;
  }
  inflight_.swap(pending_);
  pending_.clear();
  writing_ = true;
  asio::async_write(socket_, asio::buffer(inflight_),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                      self->writing_ = false;
                      if (self->state_ == State::done) return;
                      if (ec) return self->finish("upstream_error: " + ec.message(), true);
                      self->to_tcp_ += n;
                      self->inflight_.clear();
                      self->conn_->consume(self->stream_, n);
                      self->write_to_tcp();
                    });
}

void QuicTunnel::on_fin() {
  stream_fin_ = true;
  if (state_ == State::relaying) write_to_tcp();
}

void QuicTunnel::on_closed(const std::string& why) {
  if (state_ == State::done) return;
  // A clean close after both FINs is "ok"; anything else says why.
  const bool clean = why.empty() && fin_sent_ && stream_fin_ && pending_.empty() && !writing_;
  stream_ = -1;
  finish(clean ? "ok" : why.empty() ? "stream closed early" : why, false);
}

void QuicTunnel::maybe_finish() {
  // Done once both halves are closed; the stream's own close follows (acknowledgements).
  if (fin_sent_ && tcp_shut_ && state_ == State::relaying) finish("ok", false);
}

void QuicTunnel::finish(const std::string& result, bool reset_stream) {
  if (state_ == State::done) return;
  state_ = State::done;
  if (stream_ >= 0) {
    // Stream data we were given but never wrote to TCP still holds the connection's flow-control
    // credit; without this, each stream aborted with data in hand (an iperf3 server closing its
    // data socket mid-transfer) shrinks the connection's window until every stream stalls.
    conn_->consume(stream_, header_.size() + pending_.size() + inflight_.size());
    header_.clear();
    pending_.clear();
    if (reset_stream)
      conn_->reset(stream_, kAbort);
    else
      conn_->detach(stream_);
  }
  boost::system::error_code ignored;
  socket_.close(ignored);
  if (finished_) finished_(*this, result);
  finished_ = nullptr;
  // Last: this may be the final reference.
  auto keep = std::move(self_);
}

}  // namespace weft::quic
