// The relay's wire format. After TLS and an HTTP upgrade (`GET /v1/relay`, `Upgrade:
// weft-relay/1`), both sides exchange frames: a 1-byte type, a 3-byte big-endian payload
// length, the payload. QUIC datagrams travel inside SendPacket/RecvPacket frames addressed by
// the peer's node key (its Ed25519 public key), as iroh's relays do.
//
// A client proves its key before anything else: the server sends a random challenge, the
// client answers with its public key and an Ed25519 signature over a context string, the
// challenge and the TLS exporter value of this very connection (so a proof cannot be
// replayed on another connection). Control decides which keys may use the relay.
//
// FrameReader takes bytes as they come off the socket and hands out whole frames; it refuses
// oversized, unknown or malformed frames with a reason, and never buffers more than one
// frame's worth beyond what was consumed.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "core/result.h"

typedef struct ssl_st SSL;

namespace weft::relay {

using NodeKey = std::array<uint8_t, 32>;  // Ed25519 public key
using Signature = std::array<uint8_t, 64>;
using Challenge = std::array<uint8_t, 32>;

inline constexpr size_t kMaxPacket = 64 * 1024;  // a QUIC datagram with GSO headroom
inline constexpr size_t kMaxPayload = 32 + kMaxPacket;
inline constexpr char kProofContext[] = "weft-relay-v1 client proof";

enum class FrameType : uint8_t {
  server_challenge = 0x01,  // server → client: Challenge
  client_proof = 0x02,      // client → server: NodeKey, Signature
  ready = 0x03,             // server → client: the proof was accepted
  send_packet = 0x04,       // client → server: destination NodeKey, datagram
  recv_packet = 0x05,       // server → client: source NodeKey, datagram
  peer_gone = 0x06,         // server → client: NodeKey no longer connected
  ping = 0x07,              // either way: 8 bytes, answered with pong
  pong = 0x08,
  error = 0x09,  // server → client: a reason, then the server closes
};

struct Frame {
  FrameType type{};
  std::vector<uint8_t> payload;
};

// Moves whole frames from the front of `queue` into one buffer of at most `limit` bytes (at
// least one frame), so a writer sends many datagrams per TLS record and system call.
std::vector<uint8_t> take_batch(std::deque<std::vector<uint8_t>>& queue, size_t& queued,
                                size_t limit = 64 * 1024);

// Encoders.
std::vector<uint8_t> encode(FrameType type, const uint8_t* payload, size_t len);
std::vector<uint8_t> challenge_frame(const Challenge& c);
std::vector<uint8_t> proof_frame(const NodeKey& key, const Signature& sig);
std::vector<uint8_t> packet_frame(FrameType send_or_recv, const NodeKey& peer, const uint8_t* data,
                                  size_t len);
std::vector<uint8_t> error_frame(const std::string& reason);

// Decoded payloads; each checks the exact sizes.
Result<Challenge> parse_challenge(const Frame& f);
struct Proof {
  NodeKey key;
  Signature signature;
};
Result<Proof> parse_proof(const Frame& f);
struct Packet {
  NodeKey peer;
  const uint8_t* data = nullptr;  // points into the frame
  size_t len = 0;
};
Result<Packet> parse_packet(const Frame& f);

// What the client signs: context, challenge, TLS exporter (32 bytes from
// SSL_export_keying_material with label "EXPORTER-weft-relay").
std::vector<uint8_t> proof_message(const Challenge& c, const std::array<uint8_t, 32>& exporter);
// This TLS connection's exporter value, which both ends compute alike.
Result<std::array<uint8_t, 32>> tls_exporter(SSL* ssl);
// The client's proof frame: its node key and its signature over proof_message().
Result<std::vector<uint8_t>> sign_proof(const std::string& private_pem, const Challenge& c,
                                        const std::array<uint8_t, 32>& exporter);

class FrameReader {
 public:
  // Appends bytes read from the connection.
  void feed(const uint8_t* data, size_t len);
  // The next whole frame, nothing yet (std::nullopt), or an error (the connection must close).
  Result<std::optional<Frame>> next();
  size_t buffered() const { return buffer_.size() - consumed_; }

 private:
  std::vector<uint8_t> buffer_;
  size_t consumed_ = 0;
};

}  // namespace weft::relay
