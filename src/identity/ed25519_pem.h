// Ed25519 public keys in PEM ("-----BEGIN PUBLIC KEY-----", a SubjectPublicKeyInfo), read
// without OpenSSL. Control reads one on every registration and heartbeat; OpenSSL 3's
// PEM_read_bio_PUBKEY goes through its provider decoder machinery (locks, name lookups,
// allocations), which was a third of control's CPU per registration. An Ed25519 SPKI has exactly
// one DER encoding (a fixed 12-byte header, then the 32-byte key), so the check is exact.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "core/result.h"

namespace weft {

using Ed25519PublicKey = std::array<uint8_t, 32>;

// The raw key, or an error that says what is wrong with the text.
Result<Ed25519PublicKey> ed25519_public_from_pem(std::string_view pem);

}  // namespace weft
