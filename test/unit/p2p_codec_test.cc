// The P2P wire formats: signed path probes and the tunnel header of each QUIC stream.
#include <gtest/gtest.h>
#include <openssl/pem.h>

#include "agent/p2p_imports.h"
#include "identity/csr.h"
#include "identity/openssl_ptr.h"
#include "p2p/probe.h"
#include "transport/quic/quic_tunnel.h"

namespace weft {
namespace {

struct Signer {
  ossl::Key key;
  relay::NodeKey pub{};
  Signer() {
    const auto pair = generate_ed25519();
    ossl::Bio bio(
        BIO_new_mem_buf(pair.private_pem.data(), static_cast<int>(pair.private_pem.size())));
    key.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
    size_t len = pub.size();
    EVP_PKEY_get_raw_public_key(key.get(), pub.data(), &len);
  }
};

TEST(Probe, SignedProbesRoundTripAndAnyChangeIsRefused) {
  Signer s;
  probe::Probe pong{
      probe::Type::pong,
      s.pub,
      probe::new_tx(),
      boost::asio::ip::udp::endpoint(boost::asio::ip::make_address("198.51.100.7"), 51820),
      {}};
  auto bytes = probe::encode(pong, s.key.get());
  ASSERT_TRUE(bytes.ok()) << bytes.error();
  ASSERT_EQ(bytes->size(), probe::kSize);
  EXPECT_TRUE(probe::looks_like_probe(bytes->data(), bytes->size()));
  auto back = probe::parse(bytes->data(), bytes->size());
  ASSERT_TRUE(back.ok()) << back.error();
  EXPECT_EQ(back->type, probe::Type::pong);
  EXPECT_EQ(back->sender, s.pub);
  EXPECT_EQ(back->tx, pong.tx);
  EXPECT_EQ(back->observed, pong.observed);

  // Every byte matters: a changed address, a changed key or a truncated probe is refused.
  for (size_t i : {size_t{8}, size_t{20}, size_t{60}, probe::kSize - 1}) {
    auto copy = *bytes;
    copy[i] ^= 0x01;
    auto bad = probe::parse(copy.data(), copy.size());
    EXPECT_FALSE(bad.ok()) << "byte " << i;
  }
  EXPECT_FALSE(probe::parse(bytes->data(), bytes->size() - 1).ok());

  // Signed by another key than the one it names: refused.
  Signer other;
  probe::Probe forged = pong;
  forged.sender = s.pub;
  auto f = probe::encode(forged, other.key.get());
  ASSERT_TRUE(f.ok());
  auto r = probe::parse(f->data(), f->size());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("signature"), std::string::npos) << r.error();
}

TEST(Probe, APingPaddedToAFullDatagramStillVerifiesAndNothingElseMayBePadded) {
  Signer s;
  probe::Probe ping{probe::Type::ping, s.pub, probe::new_tx(), std::nullopt, {}};
  auto padded = probe::encode(ping, s.key.get(), probe::kFullDatagram);
  ASSERT_TRUE(padded.ok()) << padded.error();
  ASSERT_EQ(padded->size(), probe::kFullDatagram);
  auto back = probe::parse(padded->data(), padded->size());
  ASSERT_TRUE(back.ok()) << back.error();
  EXPECT_EQ(back->tx, ping.tx);
  // The signed part still counts; the padding does not (it only has to arrive).
  auto changed = *padded;
  changed[20] ^= 0x01;
  EXPECT_FALSE(probe::parse(changed.data(), changed.size()).ok());
  // Never padded past a full datagram, and a pong (or a ping beyond that size) is refused.
  EXPECT_EQ(probe::encode(ping, s.key.get(), 9000)->size(), probe::kFullDatagram);
  padded->push_back(0);
  EXPECT_FALSE(probe::parse(padded->data(), padded->size()).ok());
  probe::Probe pong{probe::Type::pong, s.pub, ping.tx, std::nullopt, {}};
  auto p = probe::encode(pong, s.key.get(), probe::kFullDatagram);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->size(), probe::kSize);
  p->resize(probe::kSize + 10, 0);
  EXPECT_FALSE(probe::parse(p->data(), p->size()).ok());
}

TEST(Probe, CallMeMaybeCarriesSignedAddressesOfBothFamilies) {
  Signer s;
  using boost::asio::ip::make_address;
  using boost::asio::ip::udp;
  probe::Probe call{probe::Type::call_me_maybe,
                    s.pub,
                    probe::new_tx(),
                    std::nullopt,
                    {udp::endpoint(make_address("203.0.113.9"), 41641),
                     udp::endpoint(make_address("2001:db8::7"), 51820),
                     udp::endpoint(make_address("10.0.0.4"), 51820)}};
  auto bytes = probe::encode(call, s.key.get());
  ASSERT_TRUE(bytes.ok()) << bytes.error();
  EXPECT_EQ(bytes->size(), 54 + 3 * 19 + 64);
  auto back = probe::parse(bytes->data(), bytes->size());
  ASSERT_TRUE(back.ok()) << back.error();
  EXPECT_EQ(back->type, probe::Type::call_me_maybe);
  EXPECT_EQ(back->offered, call.offered);
  EXPECT_FALSE(back->observed.has_value());

  // An address changed in flight, a count that lies about the length, a truncated offer: refused.
  auto tampered = *bytes;
  tampered[54 + 19 + 5] ^= 0x01;  // inside the IPv6 address
  EXPECT_FALSE(probe::parse(tampered.data(), tampered.size()).ok());
  auto lying = *bytes;
  lying[53] = 2;
  auto l = probe::parse(lying.data(), lying.size());
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.error().find("expected"), std::string::npos) << l.error();
  EXPECT_FALSE(probe::parse(bytes->data(), bytes->size() - 19).ok());
  auto many = *bytes;
  many[53] = probe::kMaxOffered + 1;
  auto m = probe::parse(many.data(), many.size());
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.error().find("at most"), std::string::npos) << m.error();

  call.offered.resize(probe::kMaxOffered + 1, call.offered[0]);
  EXPECT_FALSE(probe::encode(call, s.key.get()).ok());
}

TEST(TunnelHeader, RequestAndResponseParseIncrementallyAndRefuseBadInput) {
  const auto req = quic::encode_request("10.0.0.7:15008");
  size_t used = 0;
  for (size_t n = 0; n < req.size(); ++n) {
    auto partial = quic::parse_request(req.data(), n, used);
    ASSERT_TRUE(partial.ok());
    EXPECT_FALSE(partial->has_value()) << "complete after only " << n << " bytes";
  }
  auto full = quic::parse_request(req.data(), req.size(), used);
  ASSERT_TRUE(full.ok() && full->has_value());
  EXPECT_EQ((*full)->authority, "10.0.0.7:15008");
  EXPECT_EQ(used, req.size());

  const uint8_t empty[] = {0, 0};
  EXPECT_FALSE(quic::parse_request(empty, 2, used).ok());
  const auto spaced = quic::encode_request("a b");
  auto e = quic::parse_request(spaced.data(), spaced.size(), used);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().find("space"), std::string::npos);

  const auto resp = quic::encode_response(503, "cannot connect to 127.0.0.1:1");
  auto r = quic::parse_response(resp.data(), resp.size(), used);
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->status, 503);
  EXPECT_EQ((*r)->reason, "cannot connect to 127.0.0.1:1");
  const auto bogus = quic::encode_response(42, "");
  EXPECT_FALSE(quic::parse_response(bogus.data(), bogus.size(), used).ok());
}

}  // namespace
}  // namespace weft

namespace weft {
namespace {

// A peer agent's stream to an export: the export's policy decides, against the QUIC peer's node
// identity, as the data plane's inbound did when HBONE rode inside the stream.
TEST(AuthorizeExport, AdmitsOnlyWhatTheExportsPolicyAllows) {
  const std::vector<MeshExport> exports{
      {"db", "db:5432", HostPort{"127.0.0.1", 15432}, {"spiffe://mesh.test/cluster/east/*"}},
      {"web", "web:80", HostPort{"web.internal", 8080}, {"spiffe://mesh.test/cluster/x/node/1"}}};
  const std::string east = "spiffe://mesh.test/cluster/east/node/ab12";

  auto v = authorize_export(exports, "mesh.test", east, "db:5432");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->status, 200);
  EXPECT_EQ(v->target.to_string(), "127.0.0.1:15432");

  v = authorize_export(exports, "mesh.test", east, "web:80");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->status, 401);
  EXPECT_NE(v->reason.find("do not allow " + east), std::string::npos) << v->reason;

  v = authorize_export(exports, "other.test", east, "db:5432");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->status, 401) << "a peer of another trust domain";

  EXPECT_FALSE(authorize_export(exports, "mesh.test", east, "db:5433").has_value())
      << "no export by that authority: the caller answers it (HBONE inbound or 400)";
  EXPECT_FALSE(authorize_export({}, "mesh.test", east, "db:5432").has_value());
}

}  // namespace
}  // namespace weft
