// The registry in memory: every object the store holds, indexed for the one question control
// asks on every change — which agents does this concern? Each agent sees only its scope:
//   - the services its identities may reach (a policy allows its node or a workload it hosts),
//     with their endpoints, resources and the agents hosting them;
//   - what it hosts itself, and the policies that guard it (for its inbound authorization).
// It never sees the whole mesh. The store stays the source of truth; this is rebuilt from it
// at start and kept in step by apply().
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "control/store.h"
#include "core/result.h"

namespace weft {

// What the registry REST API may write, and what control writes itself ("agents").
inline constexpr const char* kRegistryKinds[] = {"clusters", "services", "endpoints", "policies",
                                                 "resources"};

struct RegistryError {
  int status = 400;
  std::string field;
  std::string message;
};

struct WatchDelta {
  int64_t revision = 0;
  bool full = false;  // `put` is the whole scoped view: replace, do not merge
  boost::json::array put;
  boost::json::array deleted;
  bool empty() const { return !full && put.empty() && deleted.empty(); }
  boost::json::object to_json() const;
};

class Registry {
 public:
  explicit Registry(std::string trust_domain = "") : trust_domain_(std::move(trust_domain)) {}

  // Validates a body for kind/name (name empty: from the body, or generated) and returns the
  // canonical object to store, or a 4xx naming the field.
  Result<boost::json::object> validate(const std::string& kind, const std::string& name,
                                       std::string_view body, RegistryError& error) const;

  void load(const std::vector<StoredObject>& objects, const std::vector<StoredChange>& log,
            int64_t revision);
  // Records a stored change: body empty is a deletion.
  void apply(int64_t rev, const std::string& kind, const std::string& name, const std::string& body,
             const std::string& prev);

  // Objects are kept serialized (a parsed JSON object costs several times its text, and there
  // may be 100,000 endpoints); get() and list() parse on demand.
  std::optional<boost::json::object> get(const std::string& kind, const std::string& name) const;
  const std::string* body(const std::string& kind, const std::string& name) const;
  bool contains(const std::string& kind, const std::string& name) const;
  std::vector<boost::json::object> list(const std::string& kind) const;
  int64_t revision() const { return revision_; }

  // What agent `agent_id` has not seen since `since`: deltas when the log still covers it,
  // else (or when its own scope changed) a full resync of its view.
  WatchDelta delta(const std::string& agent_id, int64_t since) const;
  WatchDelta full_view(const std::string& agent_id) const;

  // A workload identity this agent may obtain a certificate for: it hosts an endpoint with it.
  bool hosts_identity(const std::string& agent_id, const std::string& ns,
                      const std::string& sa) const;

  size_t log_retention = 10000;

 private:
  // The fields scoping reads, taken out of an object once when it is stored.
  struct Keys {
    std::string agent_id, service, resource_name, spiffe_id;
    std::vector<std::string> allow;  // policies
  };
  struct Entry {
    std::string body;
    int64_t rev = 0;
    Keys keys;
  };
  // A change as the watch needs it: which object, and its keys before and after (the values
  // themselves are read from the current objects when a delta is sent).
  struct LogEntry {
    int64_t rev;
    std::string kind, name;
    std::optional<Keys> value, prev;
  };
  struct Scope {
    std::set<std::string> reach;   // services this agent may reach
    std::set<std::string> hosted;  // services with an endpoint or resource on this agent
  };

  const Entry* entry(const std::string& kind, const std::string& name) const;
  Scope scope_of(const std::string& agent_id) const;
  std::vector<std::string> identities_of(const std::string& agent_id) const;
  bool in_scope(const std::string& agent_id, const Scope& s, const std::string& kind,
                const std::string& name, const Keys& k) const;
  static Keys keys_of(const std::string& kind, const boost::json::object& v);
  void index(const std::string& kind, const std::string& name, const boost::json::object& v,
             int delta);

  std::string trust_domain_;
  std::map<std::string, std::map<std::string, Entry>> objects_;
  // service -> endpoint names / resource ids / policy names; agent -> service -> count.
  std::map<std::string, std::set<std::string>> endpoints_of_, resources_of_, policies_of_;
  std::map<std::string, std::map<std::string, int>> services_on_agent_;
  std::map<std::string, std::map<std::string, int>> identities_on_agent_;  // "ns/sa" -> count
  std::deque<LogEntry> log_;
  int64_t revision_ = 0;
  int64_t log_floor_ = 0;  // the log covers every change after this revision
};

}  // namespace weft
