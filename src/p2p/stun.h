// STUN (RFC 8489) Binding, the part NAT traversal needs: a node asks a server what address its
// packets arrive from (its reflexive address). Two servers, or two ports of one, seen from the
// same local socket tell whether the NAT maps per destination (RFC 5780's OTHER-ADDRESS names
// the second). The same UDP socket will carry QUIC: looks_like_stun() tells them apart.
//
// Parsing is strict and bounded: lengths, padding and attribute sizes are checked, a
// FINGERPRINT that does not match fails the message, and unknown comprehension-optional
// attributes are skipped.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/ip/udp.hpp>

#include "core/result.h"

namespace weft::stun {

inline constexpr uint32_t kMagicCookie = 0x2112A442;
inline constexpr size_t kHeaderSize = 20;

enum class MessageType : uint16_t {
  binding_request = 0x0001,
  binding_success = 0x0101,
  binding_error = 0x0111,
};

using TransactionId = std::array<uint8_t, 12>;

struct Message {
  uint16_t type = 0;
  TransactionId transaction{};
  std::optional<boost::asio::ip::udp::endpoint> xor_mapped_address;
  std::optional<boost::asio::ip::udp::endpoint> mapped_address;  // RFC 3489 servers
  std::optional<boost::asio::ip::udp::endpoint> other_address;   // RFC 5780
  std::optional<boost::asio::ip::udp::endpoint> response_origin;
  std::string software;
  int error_code = 0;  // from ERROR-CODE, e.g. 400
  bool has_fingerprint = false;

  // The reflexive address: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an old server.
  std::optional<boost::asio::ip::udp::endpoint> reflexive() const {
    return xor_mapped_address ? xor_mapped_address : mapped_address;
  }
};

// Cheap check on the first bytes: STUN's top two bits are zero and the magic cookie sits at
// offset 4. QUIC packets always have the top bit set (long header) or the fixed bit (short).
bool looks_like_stun(const uint8_t* data, size_t len);

Result<Message> parse(const uint8_t* data, size_t len);

TransactionId new_transaction_id();
std::vector<uint8_t> binding_request(const TransactionId& id);
// A success answer: XOR-MAPPED-ADDRESS (and MAPPED-ADDRESS for RFC 3489 clients), the
// optional OTHER-ADDRESS and RESPONSE-ORIGIN, SOFTWARE and FINGERPRINT.
std::vector<uint8_t> binding_success(const TransactionId& id,
                                     const boost::asio::ip::udp::endpoint& mapped,
                                     const std::optional<boost::asio::ip::udp::endpoint>& other,
                                     const std::optional<boost::asio::ip::udp::endpoint>& origin);
std::vector<uint8_t> binding_error(const TransactionId& id, int code, const std::string& reason);

}  // namespace weft::stun
