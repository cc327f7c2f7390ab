// STUN codec: RFC 5769's published test vector, our own round trip, and refusals.
#include <gtest/gtest.h>

#include "p2p/stun.h"

namespace weft {
namespace {

namespace ip = boost::asio::ip;

std::vector<uint8_t> hex(const std::string& h) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < h.size(); i += 2)
    out.push_back(static_cast<uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

TEST(Stun, ParsesTheRfc5769SampleIpv4Response) {
  // RFC 5769 §2.2: an independent encoder's bytes, FINGERPRINT and MESSAGE-INTEGRITY included.
  const auto v =
      hex("0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147"
          "e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96");
  ASSERT_TRUE(stun::looks_like_stun(v.data(), v.size()));
  auto m = stun::parse(v.data(), v.size());
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_EQ(m->type, 0x0101);
  EXPECT_EQ(m->software, "test vector");  // 11 bytes, then one byte of padding
  EXPECT_TRUE(m->has_fingerprint);
  ASSERT_TRUE(m->reflexive());
  EXPECT_EQ(*m->reflexive(), ip::udp::endpoint(ip::make_address("192.0.2.1"), 32853));

  auto flipped = v;
  flipped[30] ^= 1;  // one bit of SOFTWARE: the fingerprint no longer matches
  EXPECT_NE(stun::parse(flipped.data(), flipped.size()).error().find("FINGERPRINT"),
            std::string::npos);
}

TEST(Stun, AnswersRoundTripForIpv4AndIpv6) {
  const auto id = stun::new_transaction_id();
  const auto req = stun::binding_request(id);
  auto r = stun::parse(req.data(), req.size());
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->type, static_cast<uint16_t>(stun::MessageType::binding_request));
  EXPECT_EQ(r->transaction, id);
  for (const char* addr : {"203.0.113.9", "2001:db8::42"}) {
    const ip::udp::endpoint mapped(ip::make_address(addr), 61000);
    const ip::udp::endpoint other(ip::make_address("198.51.100.1"), 3479);
    const auto ans = stun::binding_success(id, mapped, other, std::nullopt);
    auto a = stun::parse(ans.data(), ans.size());
    ASSERT_TRUE(a.ok()) << a.error();
    EXPECT_EQ(a->xor_mapped_address, mapped);
    EXPECT_EQ(a->mapped_address, mapped);
    EXPECT_EQ(a->other_address, other);
    EXPECT_EQ(a->software, "weft");
  }
  const auto err = stun::binding_error(id, 420, "Unknown Attribute");
  EXPECT_EQ(stun::parse(err.data(), err.size())->error_code, 420);
}

TEST(Stun, RefusesMalformedDatagramsWithAReason) {
  const auto req = stun::binding_request(stun::new_transaction_id());
  EXPECT_FALSE(stun::parse(req.data(), 19).ok());
  auto longer = req;
  longer.push_back(0);
  EXPECT_NE(stun::parse(longer.data(), longer.size()).error().find("does not match"),
            std::string::npos);
  const uint8_t quic[24] = {0xc3, 0, 0, 0, 1};
  EXPECT_FALSE(stun::looks_like_stun(quic, sizeof quic));
  EXPECT_NE(stun::parse(quic, sizeof quic).error().find("not STUN"), std::string::npos);
  // An attribute whose length runs past the datagram.
  auto bad = hex("000100082112a442000102030405060708090a0b00200014abcd0000");
  EXPECT_NE(stun::parse(bad.data(), bad.size()).error().find("runs past the end"),
            std::string::npos);
}

}  // namespace
}  // namespace weft
