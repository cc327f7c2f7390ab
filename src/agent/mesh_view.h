// What control has told this agent (its scoped slice of the registry, kept by the watch), and
// the data plane that follows from it:
//   - imports: services this agent may reach on other agents, each a local listener that
//     tunnels over HBONE to the healthy agents hosting it;
//   - exports: what this agent hosts, each an HBONE target guarded by the policies naming it.
// The view is persisted, so a restarted agent serves its last config while control is away.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "core/host_port.h"
#include "core/result.h"

namespace weft {

struct MeshImport {
  std::string service;
  uint16_t port = 0;
  std::string authority;  // "<service>:<port>": what the hosting agents map to their target
  std::vector<HostPort> peers;
  std::vector<std::string> peer_ids;     // node identities the peers must present
  std::vector<std::string> peer_agents;  // their agent ids
};

// Another agent, as control publishes it.
struct MeshAgent {
  std::string id, name, cluster, spiffe_id, hbone, node_key;
  std::vector<std::string> candidates;  // UDP host:port its QUIC endpoint may be reached at
  bool p2p = false;                     // it runs a QUIC endpoint
};

struct MeshExport {
  std::string service;
  std::string authority;
  HostPort target;
  std::vector<std::string> allow;  // from the policies; empty: not exported at all
};

class MeshView {
 public:
  int64_t revision() const { return revision_; }
  size_t size() const { return objects_.size(); }

  // A watch answer: {"revision", "full", "put": [{kind,name,value}], "deleted": [{kind,name}]}.
  Result<bool> apply(const boost::json::object& delta);

  std::vector<MeshImport> imports(const std::string& self) const;
  std::vector<MeshExport> exports(const std::string& self) const;
  std::vector<MeshAgent> agents() const;

  void save(const std::filesystem::path& file) const;
  static MeshView load(const std::filesystem::path& file);  // empty if missing or damaged

 private:
  const boost::json::object* get(const std::string& kind, const std::string& name) const;
  std::string authority_of(const std::string& service, int64_t own_port) const;

  std::map<std::string, boost::json::object> objects_;  // "kind/name" -> value
  int64_t revision_ = -1;                               // -1: never synced
};

}  // namespace weft
