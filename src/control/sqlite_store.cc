#include <arpa/inet.h>
#include <sqlite3.h>

#include <stdexcept>
#include <string>
#include <unordered_map>

#include "control/store.h"

namespace weft {

std::string MeshPool::cidr() const {
  in_addr a{htonl(base)};
  return std::string(inet_ntoa(a)) + "/" + std::to_string(prefix);
}

std::string MeshPool::block_cidr(uint32_t block) const {
  in_addr a{htonl(base + block * 256)};
  return std::string(inet_ntoa(a)) + "/24";
}

std::string MeshPool::agent_ip(uint32_t block) const {
  in_addr a{htonl(base + block * 256 + 1)};
  return inet_ntoa(a);
}

Result<MeshPool> parse_mesh_pool(const std::string& cidr) {
  const auto slash = cidr.find('/');
  in_addr a{};
  if (slash == std::string::npos || inet_pton(AF_INET, cidr.substr(0, slash).c_str(), &a) != 1)
    return make_error("mesh pool '" + cidr + "' is not an IPv4 CIDR like 100.64.0.0/10");
  unsigned prefix = 0;
  try {
    prefix = static_cast<unsigned>(std::stoul(cidr.substr(slash + 1)));
  } catch (const std::exception&) {
    return make_error("mesh pool '" + cidr + "': bad prefix length");
  }
  if (prefix < 8 || prefix > 24)
    return make_error("mesh pool '" + cidr +
                      "': prefix must be /8 to /24 (each agent takes a /24)");
  MeshPool p;
  p.prefix = prefix;
  p.base = ntohl(a.s_addr) & ~((1u << (32 - prefix)) - 1);
  return p;
}

namespace {

// Prepared statements, kept per SQL text for the store's life: preparing (parsing the SQL) was a
// tenth of control's CPU per registration.
class StatementCache {
 public:
  ~StatementCache() { clear(); }
  void clear() {
    for (auto& [sql, e] : entries_) sqlite3_finalize(e.stmt);
    entries_.clear();
  }
  sqlite3* db = nullptr;

 private:
  friend class Statement;
  struct Entry {
    sqlite3_stmt* stmt = nullptr;
    bool in_use = false;
  };
  std::unordered_map<std::string, Entry> entries_;
};

class Statement {
 public:
  Statement(StatementCache& cache, const char* sql) {
    auto [it, fresh] = cache.entries_.try_emplace(sql);
    if (!fresh && !it->second.in_use) {
      entry_ = &it->second;
    } else {
      sqlite3_stmt* stmt = nullptr;
      if (sqlite3_prepare_v3(cache.db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr) !=
          SQLITE_OK) {
        if (fresh) cache.entries_.erase(it);
        throw std::runtime_error(std::string("sqlite: ") + sqlite3_errmsg(cache.db) +
                                 " in: " + sql);
      }
      if (fresh) {
        it->second.stmt = stmt;
        entry_ = &it->second;
      } else {
        own_ = stmt;  // the cached one is in use further up the stack
      }
    }
    if (entry_) entry_->in_use = true;
    stmt_ = entry_ ? entry_->stmt : own_;
  }
  ~Statement() {
    if (own_) {
      sqlite3_finalize(own_);
      return;
    }
    // Reset ends the statement (no read lock kept into COMMIT); the bindings go with it.
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    entry_->in_use = false;
  }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  Statement& bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw std::runtime_error(std::string("sqlite: ") + sqlite3_errmsg(sqlite3_db_handle(stmt_)));
  }
  std::string text(int col) {
    auto* p = sqlite3_column_text(stmt_, col);
    return p ? reinterpret_cast<const char*>(p) : "";
  }
  int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }

 private:
  StatementCache::Entry* entry_ = nullptr;
  sqlite3_stmt* own_ = nullptr;
  sqlite3_stmt* stmt_ = nullptr;
};

// Schema versions, applied in order; user_version records how far a database has come.
const char* const kMigrations[] = {
    R"(CREATE TABLE join_keys(id TEXT PRIMARY KEY, hash TEXT UNIQUE NOT NULL, cluster TEXT NOT NULL,
         reusable INTEGER NOT NULL, expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL,
         uses INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0);
       CREATE TABLE agents(id TEXT PRIMARY KEY, name TEXT NOT NULL, cluster TEXT NOT NULL,
         public_key TEXT UNIQUE NOT NULL, block INTEGER UNIQUE NOT NULL,
         registered_at INTEGER NOT NULL, last_seen INTEGER NOT NULL);
       CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);)",
    R"(CREATE TABLE objects(kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
         rev INTEGER NOT NULL, PRIMARY KEY(kind, name));
       CREATE TABLE changes(rev INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
         body TEXT NOT NULL, prev TEXT NOT NULL);
       INSERT INTO meta(key, value) VALUES('revision', '0');)",
};

class SqliteStore final : public ControlStore {
 public:
  SqliteStore(const std::filesystem::path& file, const MeshPool* pool) {
    if (sqlite3_open(file.c_str(), &db_) != SQLITE_OK)
      throw std::runtime_error("cannot open " + file.string() + ": " + sqlite3_errmsg(db_));
    stmts_.db = db_;
    exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;");
    sqlite3_busy_timeout(db_, 5000);  // the CLI may write keys while control runs
    migrate();
    {
      Statement rev(stmts_, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='revision'");
      if (rev.step()) revision_ = rev.integer(0);
    }
    if (!pool) return;
    Statement get(stmts_, "SELECT value FROM meta WHERE key='mesh_pool'");
    if (get.step()) {
      if (get.text(0) != pool->cidr())
        throw std::runtime_error("the data in " + file.string() + " was allocated from mesh pool " +
                                 get.text(0) + ", not " + pool->cidr() +
                                 "; start with --mesh-cidr " + get.text(0));
    } else {
      Statement put(stmts_, "INSERT INTO meta(key, value) VALUES('mesh_pool', ?)");
      put.bind(1, pool->cidr()).step();
    }
  }
  ~SqliteStore() override {
    stmts_.clear();  // every statement finalized first, or the close fails as busy
    sqlite3_close(db_);
  }

  void create_join_key(const JoinKey& k) override {
    Statement s(stmts_,
                "INSERT INTO join_keys(id, hash, cluster, reusable, expires_at, created_at) "
                "VALUES(?,?,?,?,?,?)");
    s.bind(1, k.id)
        .bind(2, k.hash)
        .bind(3, k.cluster)
        .bind(4, int64_t{k.reusable})
        .bind(5, k.expires_at)
        .bind(6, k.created_at)
        .step();
  }

  std::vector<JoinKey> list_join_keys() override {
    std::vector<JoinKey> out;
    Statement s(stmts_,
                "SELECT id, hash, cluster, reusable, expires_at, created_at, uses, revoked FROM "
                "join_keys ORDER BY created_at");
    while (s.step())
      out.push_back({s.text(0), s.text(1), s.text(2), s.integer(3) != 0, s.integer(4), s.integer(5),
                     s.integer(6), s.integer(7) != 0});
    return out;
  }

  bool revoke_join_key(const std::string& id) override {
    Statement s(stmts_, "UPDATE join_keys SET revoked=1 WHERE id=?");
    s.bind(1, id).step();
    return sqlite3_changes(db_) > 0;
  }

  RegisterOutcome register_agent(const Registration& r, const MeshPool& pool,
                                 int64_t now) override {
    exec("BEGIN IMMEDIATE");
    try {
      RegisterOutcome out = register_in_transaction(r, pool, now);
      exec(out.agent ? "COMMIT" : "ROLLBACK");
      return out;
    } catch (...) {
      exec("ROLLBACK");
      throw;
    }
  }

  std::vector<AgentRecord> list_agents() override {
    std::vector<AgentRecord> out;
    Statement s(stmts_,
                "SELECT id, name, cluster, public_key, block, registered_at, last_seen FROM agents "
                "ORDER BY block");
    while (s.step())
      out.push_back({s.text(0), s.text(1), s.text(2), s.text(3),
                     static_cast<uint32_t>(s.integer(4)), s.integer(5), s.integer(6)});
    return out;
  }

  bool touch_agent(const std::string& id, int64_t now) override {
    Statement s(stmts_, "UPDATE agents SET last_seen=? WHERE id=?");
    s.bind(1, now).bind(2, id).step();
    return sqlite3_changes(db_) > 0;
  }

  int64_t put_object(const std::string& kind, const std::string& name,
                     const std::string& body) override {
    return change(kind, name, body);
  }

  int64_t delete_object(const std::string& kind, const std::string& name) override {
    return change(kind, name, "");
  }

  std::vector<StoredObject> list_objects() override {
    std::vector<StoredObject> out;
    Statement s(stmts_, "SELECT kind, name, body, rev FROM objects ORDER BY kind, name");
    while (s.step()) out.push_back({s.text(0), s.text(1), s.text(2), s.integer(3)});
    return out;
  }

  std::vector<StoredChange> changes_since(int64_t rev) override {
    std::vector<StoredChange> out;
    Statement s(stmts_,
                "SELECT rev, kind, name, body, prev FROM changes WHERE rev > ? ORDER BY rev");
    s.bind(1, rev);
    while (s.step()) out.push_back({s.integer(0), s.text(1), s.text(2), s.text(3), s.text(4)});
    return out;
  }

  int64_t revision() override { return revision_; }

 private:
  // One put (body non-empty) or delete, its change-log entry and the new revision, atomically.
  int64_t change(const std::string& kind, const std::string& name, const std::string& body) {
    exec("BEGIN IMMEDIATE");
    try {
      std::string prev;
      {
        Statement get(stmts_, "SELECT body FROM objects WHERE kind=? AND name=?");
        get.bind(1, kind).bind(2, name);
        if (get.step()) prev = get.text(0);
      }
      if (body.empty() && prev.empty()) {
        exec("ROLLBACK");
        return 0;
      }
      const int64_t rev = revision_ + 1;
      if (body.empty()) {
        Statement del(stmts_, "DELETE FROM objects WHERE kind=? AND name=?");
        del.bind(1, kind).bind(2, name).step();
      } else {
        Statement put(stmts_,
                      "INSERT OR REPLACE INTO objects(kind, name, body, rev) VALUES(?,?,?,?)");
        put.bind(1, kind).bind(2, name).bind(3, body).bind(4, rev).step();
      }
      Statement log(stmts_, "INSERT INTO changes(rev, kind, name, body, prev) VALUES(?,?,?,?,?)");
      log.bind(1, rev).bind(2, kind).bind(3, name).bind(4, body).bind(5, prev).step();
      Statement meta(stmts_, "UPDATE meta SET value=? WHERE key='revision'");
      meta.bind(1, std::to_string(rev)).step();
      // Trim in batches so that the log costs one index range delete per thousand changes.
      if (rev % 1000 == 0 && rev > static_cast<int64_t>(log_retention)) {
        Statement trim(stmts_, "DELETE FROM changes WHERE rev <= ?");
        trim.bind(1, rev - static_cast<int64_t>(log_retention)).step();
      }
      exec("COMMIT");
      revision_ = rev;
      return rev;
    } catch (...) {
      exec("ROLLBACK");
      throw;
    }
  }

  RegisterOutcome register_in_transaction(const Registration& r, const MeshPool& pool,
                                          int64_t now) {
    RegisterOutcome out;
    {
      Statement s(stmts_,
                  "SELECT id, name, cluster, public_key, block, registered_at FROM agents WHERE "
                  "public_key=?");
      s.bind(1, r.public_key);
      if (s.step()) {  // a known node: same ID, same block (idempotent)
        AgentRecord a{
            s.text(0),    s.text(1), s.text(2), s.text(3), static_cast<uint32_t>(s.integer(4)),
            s.integer(5), now};
        Statement touch(stmts_, "UPDATE agents SET last_seen=? WHERE id=?");
        touch.bind(1, now).bind(2, a.id).step();
        out.agent = a;
        return out;
      }
    }
    const auto deny = [&](const std::string& why) {
      out.status = 401;
      out.error = why;
      return out;
    };
    if (r.key_hash.empty()) return deny("auth_key is required for a node control has not seen");
    Statement k(
        stmts_,
        "SELECT id, cluster, reusable, expires_at, uses, revoked FROM join_keys WHERE hash=?");
    k.bind(1, r.key_hash);
    if (!k.step()) return deny("unknown join key");
    const std::string key_id = k.text(0), key_cluster = k.text(1);
    if (k.integer(5)) return deny("join key " + key_id + " was revoked");
    if (k.integer(3) <= now) return deny("join key " + key_id + " has expired");
    if (!k.integer(2) && k.integer(4) > 0)
      return deny("join key " + key_id + " is single-use and was already used");
    if (!key_cluster.empty() && !r.cluster.empty() && key_cluster != r.cluster)
      return deny("join key " + key_id + " is for cluster '" + key_cluster + "', not '" +
                  r.cluster + "'");

    // Next block after the highest (an index lookup); only when the pool's end is reached, the
    // lowest gap left by removed agents (a scan, rare).
    int64_t block = -1;
    {
      Statement top(stmts_, "SELECT COALESCE(MAX(block) + 1, 0) FROM agents");
      top.step();
      block = top.integer(0);
    }
    if (block >= static_cast<int64_t>(pool.block_count())) {
      Statement z(stmts_, "SELECT 1 FROM agents WHERE block=0");
      if (!z.step()) {
        block = 0;
      } else {
        Statement g(stmts_,
                    "SELECT MIN(a.block + 1) FROM agents a LEFT JOIN agents b ON b.block = a.block "
                    "+ 1 WHERE b.block IS NULL");
        g.step();
        block = g.integer(0);
      }
    }
    if (block < 0 || block >= static_cast<int64_t>(pool.block_count())) {
      out.status = 503;
      out.error =
          "mesh IP pool " + pool.cidr() + " is exhausted: all " +
          std::to_string(pool.block_count()) +
          " /24 blocks are allocated; start control with a wider --mesh-cidr or remove agents";
      return out;
    }
    AgentRecord a{r.agent_id,
                  r.name,
                  r.cluster.empty() ? key_cluster : r.cluster,
                  r.public_key,
                  static_cast<uint32_t>(block),
                  now,
                  now};
    Statement ins(stmts_,
                  "INSERT INTO agents(id, name, cluster, public_key, block, registered_at, "
                  "last_seen) VALUES(?,?,?,?,?,?,?)");
    ins.bind(1, a.id)
        .bind(2, a.name)
        .bind(3, a.cluster)
        .bind(4, a.public_key)
        .bind(5, int64_t{a.block})
        .bind(6, now)
        .bind(7, now)
        .step();
    Statement use(stmts_, "UPDATE join_keys SET uses = uses + 1 WHERE id=?");
    use.bind(1, key_id).step();
    out.agent = a;
    return out;
  }

  void exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "unknown";
      sqlite3_free(err);
      throw std::runtime_error("sqlite: " + msg);
    }
  }

  void migrate() {
    Statement v(stmts_, "PRAGMA user_version");
    v.step();
    int64_t version = v.integer(0);
    const int64_t latest = static_cast<int64_t>(std::size(kMigrations));
    if (version > latest)
      throw std::runtime_error("the control database is schema version " + std::to_string(version) +
                               ", newer than this weft understands (" + std::to_string(latest) +
                               ")");
    for (; version < latest; ++version) {
      exec("BEGIN");
      exec(kMigrations[version]);
      exec(("PRAGMA user_version=" + std::to_string(version + 1)).c_str());
      exec("COMMIT");
    }
  }

  sqlite3* db_ = nullptr;
  StatementCache stmts_;
  int64_t revision_ = 0;
};

}  // namespace

std::unique_ptr<ControlStore> open_sqlite_store(const std::filesystem::path& data_dir,
                                                const MeshPool* pool) {
  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) throw std::runtime_error("cannot create " + data_dir.string() + ": " + ec.message());
  return std::make_unique<SqliteStore>(data_dir / "control.db", pool);
}

}  // namespace weft
