// The relay's frames: round trips, byte-at-a-time delivery, and refusals.
#include <gtest/gtest.h>

#include "p2p/relay_frame.h"

namespace weft {
namespace {

TEST(RelayFrame, FramesSurviveAnySplitOfTheByteStream) {
  relay::NodeKey key{};
  for (size_t i = 0; i < key.size(); ++i) key[i] = static_cast<uint8_t>(i);
  relay::Challenge challenge{};
  challenge.fill(7);
  relay::Signature sig{};
  sig.fill(9);
  std::vector<uint8_t> datagram(1350, 0x5a);
  std::vector<uint8_t> stream;
  for (const auto& f :
       {relay::challenge_frame(challenge), relay::proof_frame(key, sig),
        relay::packet_frame(relay::FrameType::send_packet, key, datagram.data(), datagram.size()),
        relay::error_frame("bye")})
    stream.insert(stream.end(), f.begin(), f.end());

  relay::FrameReader reader;
  std::vector<relay::Frame> frames;
  for (uint8_t b : stream) {  // the worst case: one byte per read
    reader.feed(&b, 1);
    for (;;) {
      auto f = reader.next();
      ASSERT_TRUE(f.ok()) << f.error();
      if (!*f) break;
      frames.push_back(std::move(**f));
    }
  }
  ASSERT_EQ(frames.size(), 4u);
  EXPECT_EQ(*relay::parse_challenge(frames[0]), challenge);
  auto proof = relay::parse_proof(frames[1]);
  ASSERT_TRUE(proof.ok());
  EXPECT_EQ(proof->key, key);
  EXPECT_EQ(proof->signature, sig);
  auto packet = relay::parse_packet(frames[2]);
  ASSERT_TRUE(packet.ok());
  EXPECT_EQ(packet->peer, key);
  EXPECT_EQ(std::vector<uint8_t>(packet->data, packet->data + packet->len), datagram);
  EXPECT_EQ(std::string(frames[3].payload.begin(), frames[3].payload.end()), "bye");
  EXPECT_EQ(reader.buffered(), 0u);
}

TEST(RelayFrame, RefusesUnknownOversizedAndMisshapenFrames) {
  relay::FrameReader unknown;
  const uint8_t bad_type[] = {0x42, 0, 0, 0};
  unknown.feed(bad_type, sizeof bad_type);
  EXPECT_NE(unknown.next().error().find("unknown relay frame type 66"), std::string::npos);

  relay::FrameReader huge;
  const uint8_t too_big[] = {0x04, 0xff, 0xff, 0xff};
  huge.feed(too_big, sizeof too_big);
  EXPECT_NE(huge.next().error().find("over the"), std::string::npos)
      << "refused from the header, before 16 MiB are buffered";

  relay::Frame short_proof{relay::FrameType::client_proof, std::vector<uint8_t>(95)};
  EXPECT_FALSE(relay::parse_proof(short_proof).ok());
  relay::Frame empty_packet{relay::FrameType::send_packet, std::vector<uint8_t>(32)};
  EXPECT_FALSE(relay::parse_packet(empty_packet).ok());
  relay::Frame wrong{relay::FrameType::ping, std::vector<uint8_t>(32)};
  EXPECT_FALSE(relay::parse_challenge(wrong).ok());
}

TEST(RelayFrame, TheProofBindsChallengeAndConnection) {
  relay::Challenge c{};
  c.fill(1);
  std::array<uint8_t, 32> exporter{};
  exporter.fill(2);
  const auto a = relay::proof_message(c, exporter);
  exporter[31] = 3;  // another TLS connection
  EXPECT_NE(a, relay::proof_message(c, exporter));
  EXPECT_EQ(std::string(a.begin(), a.begin() + 26), "weft-relay-v1 client proof");
}

}  // namespace
}  // namespace weft
