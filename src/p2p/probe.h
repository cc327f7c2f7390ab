// Path probes: small signed UDP messages that agents send to each other's candidate addresses
// on the QUIC socket, to open NAT mappings and find a direct path (RFC 8445's connectivity
// checks, in the spirit of Tailscale's disco pings). STUN has its magic cookie and probes an
// 8-byte magic; everything else on the socket is taken as QUIC (whose fixed bit ngtcp2 may
// grease, so the first byte alone cannot tell).
//
// Layout (136 bytes): magic "\x10weftprb" | type (1 ping, 2 pong) | sender's node key (32) |
// transaction (12) | observed address: family (0, 4 or 6), port (2), address (16) |
// Ed25519 signature by the sender over everything before it (64).
// A ping may carry zero padding after its signature, up to kFullDatagram bytes in all: its pong
// then proves that the path carries QUIC datagrams of that size (Tailscale's disco pings
// measure a peer's path MTU alike); the padding is not signed and means nothing else.
// A pong echoes the ping's transaction and says where the ping came from. Probes that do not
// verify against the key they name are dropped; the endpoint also drops keys it does not know.
//
// Call-me-maybe (type 3, Tailscale's name) travels over the relay only and offers the sender's
// current candidates, so the receiver pings them at once while the sender pings the receiver's:
// both NATs open their mappings at the same moment. Layout: magic | type 3 | key (32) |
// transaction (12) | count (1, at most kMaxOffered) | count x (family, port (2), address (16)) |
// signature (64) over everything before it.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <boost/asio/ip/udp.hpp>

#include "core/result.h"
#include "p2p/relay_frame.h"

namespace weft::probe {

inline constexpr size_t kSize = 136;  // ping and pong
// The largest QUIC datagram a direct path gets: an Ethernet MTU of 1500 less the IPv6 and UDP
// headers. A path not proven to carry it gets QUIC's minimum, 1200.
inline constexpr size_t kFullDatagram = 1452;
inline constexpr size_t kMaxOffered = 16;
enum class Type : uint8_t { ping = 1, pong = 2, call_me_maybe = 3 };
using TxId = std::array<uint8_t, 12>;

struct Probe {
  Type type = Type::ping;
  relay::NodeKey sender{};
  TxId tx{};
  std::optional<boost::asio::ip::udp::endpoint> observed;  // pongs: where the ping came from
  std::vector<boost::asio::ip::udp::endpoint> offered;     // call-me-maybe: try these
};

bool looks_like_probe(const uint8_t* data, size_t len);
// Checks size, fields and the signature against the sender key it carries.
Result<Probe> parse(const uint8_t* data, size_t len);
// Signs with the node's private key (Ed25519); a ping is padded with zeros to `pad_to` bytes.
Result<std::vector<uint8_t>> encode(const Probe& p, EVP_PKEY* key, size_t pad_to = 0);
TxId new_tx();

}  // namespace weft::probe
