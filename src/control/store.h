// The control plane's durable state behind one interface, so that an etcd backend can replace
// the embedded SQLite one. Operations are whole domain steps (register an agent, create a key),
// each atomic, rather than raw reads and writes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/result.h"

namespace weft {

// The mesh address pool, cut into /24 blocks: agent N gets block N, its own address is the
// block's .1, and the rest of the block is for its resources.
struct MeshPool {
  uint32_t base = 0;  // host order
  unsigned prefix = 10;
  uint32_t block_count() const { return prefix > 24 ? 0 : (1u << (24 - prefix)); }
  std::string cidr() const;
  std::string block_cidr(uint32_t block) const;
  std::string agent_ip(uint32_t block) const;
};
Result<MeshPool> parse_mesh_pool(const std::string& cidr);

struct JoinKey {
  std::string id;    // public handle, for list and revoke
  std::string hash;  // SHA-256 of the secret; the secret itself is never stored
  std::string cluster;
  bool reusable = false;
  int64_t expires_at = 0;
  int64_t created_at = 0;
  int64_t uses = 0;
  bool revoked = false;
};

struct AgentRecord {
  std::string id;
  std::string name;
  std::string cluster;
  std::string public_key;  // PEM
  uint32_t block = 0;
  int64_t registered_at = 0;
  int64_t last_seen = 0;
};

struct Registration {
  std::string key_hash;  // empty when the agent re-registers with proof of its existing key
  std::string name;
  std::string cluster;
  std::string public_key;
  std::string agent_id;  // derived from the public key by the caller
};

// A registry object (service, endpoint, policy, resource, cluster, agent record) as JSON,
// keyed by kind and name, with the revision of its last change.
struct StoredObject {
  std::string kind;
  std::string name;
  std::string body;
  int64_t rev = 0;
};

// One entry of the change log watchers resume from. `body` is empty for a deletion; `prev` is
// the body before the change, so a deletion can still be scoped to the watchers it concerns.
struct StoredChange {
  int64_t rev = 0;
  std::string kind;
  std::string name;
  std::string body;
  std::string prev;
};

struct RegisterOutcome {
  std::optional<AgentRecord> agent;
  int status = 200;  // 401 bad/expired/used/revoked key, 503 pool exhausted
  std::string error;
};

class ControlStore {
 public:
  virtual ~ControlStore() = default;
  virtual void create_join_key(const JoinKey& key) = 0;
  virtual std::vector<JoinKey> list_join_keys() = 0;
  virtual bool revoke_join_key(const std::string& id) = 0;
  // Atomically: an agent with this public key keeps its ID and block; a new one needs a valid
  // key (not expired, not revoked, unused unless reusable) and gets the lowest free block.
  virtual RegisterOutcome register_agent(const Registration& r, const MeshPool& pool,
                                         int64_t now) = 0;
  virtual std::vector<AgentRecord> list_agents() = 0;
  // Records a heartbeat; false if no such agent.
  virtual bool touch_agent(const std::string& id, int64_t now) = 0;

  // The registry: each put or delete is one transaction that bumps the revision and appends to
  // the change log, which keeps the newest `log_retention` entries. Deleting a missing object
  // returns 0.
  virtual int64_t put_object(const std::string& kind, const std::string& name,
                             const std::string& body) = 0;
  virtual int64_t delete_object(const std::string& kind, const std::string& name) = 0;
  virtual std::vector<StoredObject> list_objects() = 0;
  virtual std::vector<StoredChange> changes_since(int64_t rev) = 0;
  virtual int64_t revision() = 0;
  size_t log_retention = 10000;
};

// Opens (creating if needed) `<data_dir>/control.db` in WAL mode and applies migrations. With a
// pool, refuses one that differs from the pool the data was allocated from (operator commands
// that touch no addresses pass none). Throws std::runtime_error.
std::unique_ptr<ControlStore> open_sqlite_store(const std::filesystem::path& data_dir,
                                                const MeshPool* pool);

}  // namespace weft
