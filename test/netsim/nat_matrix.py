#!/usr/bin/python3
"""A simulated internet in network namespaces: control (with STUN and the relay) in a "public"
namespace, and sites behind NATs of five kinds, each running a real `weft agent` (and its data
plane) that hosts an echo resource every other site imports. Asserts that every pair carries
data, that the pairs where hole punching can work go direct within 3 s, that the others stay
on the relay, and that cutting a direct path mid-transfer keeps the stream alive through the
relay and restoring it brings the path back to direct.

Needs root (namespaces, veth, iptables); otherwise prints SKIP and exits 77, which CTest
counts as skipped. Everything it creates is removed at exit.

usage: nat_matrix.py WEFT_BINARY
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
TAG = f"w{os.getpid() % 100000}"
PUB = f"{TAG}pub"
CONTROL_IP = "198.18.0.1"

# kind: 1 none, 2 endpoint-independent mapping and filtering, 3 endpoint-independent mapping
# with address-and-port-dependent filtering (MASQUERADE), 4 symmetric (MASQUERADE
# --random-fully), 5 UDP blocked.
SITES = [(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (6, 5)]  # (site number, NAT kind)
KIND_NAMES = {1: "none", 2: "EIM/EIF", 3: "EIM/APDF", 4: "symmetric", 5: "UDP blocked"}


def expected_direct(k1, k2):
    """Where hole punching works. Both sides ping each other's candidates and ping back the
    address each ping came from, so a symmetric NAT still meets an open (1) or endpoint-
    independently filtering (2) peer; it cannot meet one that filters by address and port (3)
    or another symmetric NAT; without UDP nothing is direct."""
    if 5 in (k1, k2):
        return False
    if 4 in (k1, k2):
        other = k2 if k1 == 4 else k1
        return other in (1, 2)
    return True


def sh(*args, check=True, ns=None, capture=False, timeout=30):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout if capture else r.returncode


class World:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="weft-netsim-")
        self.procs = []
        self.namespaces = []

    def netns(self, name):
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=name)

    def build(self):
        self.netns(PUB)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=PUB)
        sh("ip", "addr", "add", f"{CONTROL_IP}/24", "dev", "br0", ns=PUB)
        sh("ip", "link", "set", "br0", "up", ns=PUB)
        for n, kind in SITES:
            site = f"{TAG}s{n}"
            self.netns(site)
            if kind == 1:
                # No NAT: the site itself sits on the public segment.
                self.veth(site, "eth0", PUB, f"p{n}", f"198.18.0.{100 + n}/24")
                continue
            router = f"{TAG}r{n}"
            self.netns(router)
            self.veth(router, "wan", PUB, f"p{n}", f"198.18.0.{10 + n}/24")
            self.veth(router, "lan", site, "eth0", f"10.{n}.0.1/24", peer_ip=f"10.{n}.0.2/24")
            sh("ip", "route", "add", "default", "via", f"10.{n}.0.1", ns=site)
            ipt = ["iptables", "-w"]
            # Like every home router, nothing on the router itself is open to the internet.
            # This matters for two MASQUERADE routers: a ping that reaches a router before its
            # own site has pinged out would otherwise be accepted to the router's INPUT and
            # leave a conntrack entry (peer:51820 -> router:51820); the router's outgoing
            # mapping to that peer would clash with it, get a random port, and both filters
            # would drop everything after. Dropped here, the ping leaves no entry.
            sh(*ipt, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate",
               "ESTABLISHED,RELATED", "-j", "ACCEPT", ns=router)
            sh(*ipt, "-A", "INPUT", "-i", "wan", "-j", "DROP", ns=router)
            if kind == 2:
                sh(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "SNAT",
                   "--to-source", f"198.18.0.{10 + n}", ns=router)
                sh(*ipt, "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp", "--dport",
                   "51820", "-j", "DNAT", "--to-destination", f"10.{n}.0.2:51820", ns=router)
            elif kind in (3, 5):
                sh(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", ns=router)
                if kind == 5:
                    sh(*ipt, "-A", "FORWARD", "-p", "udp", "-j", "DROP", ns=router)
            elif kind == 4:
                sh(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE",
                   "--random-fully", ns=router)

    def veth(self, ns_a, if_a, ns_b, if_b, ip_a, peer_ip=None):
        tmp_a, tmp_b = f"{TAG}a{if_b}", f"{TAG}b{if_b}"
        sh("ip", "link", "add", tmp_a[:15], "type", "veth", "peer", "name", tmp_b[:15])
        sh("ip", "link", "set", tmp_a[:15], "netns", ns_a)
        sh("ip", "link", "set", tmp_b[:15], "netns", ns_b)
        sh("ip", "link", "set", tmp_a[:15], "name", if_a, ns=ns_a)
        sh("ip", "link", "set", tmp_b[:15], "name", if_b, ns=ns_b)
        sh("ip", "addr", "add", ip_a, "dev", if_a, ns=ns_a)
        sh("ip", "link", "set", if_a, "up", ns=ns_a)
        if peer_ip:
            sh("ip", "addr", "add", peer_ip, "dev", if_b, ns=ns_b)
        else:
            sh("ip", "link", "set", if_b, "master", "br0", ns=ns_b)
        sh("ip", "link", "set", if_b, "up", ns=ns_b)

    def spawn(self, ns, args, log):
        out = open(os.path.join(self.work, log), "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(a) for a in args], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def teardown(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if os.environ.get("KEEP"):
            print(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def wait_for(what, fn, timeout=30.0, interval=0.1):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)  # polling interval
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def echo_in(ns, port, payload="ping"):
    """One round trip through the import port from inside a site's namespace."""
    code = ("import socket,sys\ns=socket.create_connection(('127.0.0.1',%d),timeout=5)\n"
            "s.sendall(b'%s')\nd=b''\nwhile len(d)<%d:\n  c=s.recv(100)\n  if not c: break\n"
            "  d+=c\nsys.stdout.write(d.decode())" % (port, payload, len(payload)))
    r = subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code],
                       capture_output=True, text=True, timeout=15)
    return r.stdout == payload


def agent_status(ns):
    out = sh("curl", "-s", "-m", "2", "http://127.0.0.1:8081/status", ns=ns, capture=True,
             check=False)
    try:
        return json.loads(out)
    except ValueError:
        return {}


def peer_status(ns, peer_name):
    p2p = agent_status(ns).get("p2p") or {}
    for peer in p2p.get("peers", []):
        if peer.get("name") == peer_name or peer.get("spiffe_id", "").endswith(peer_name):
            return peer
    return {}


def peer_path(ns, peer_name):
    return peer_status(ns, peer_name).get("path")


def peer_datagram(ns, peer_name):
    return peer_status(ns, peer_name).get("max_datagram")


ECHO = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000)); s.listen(64)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def main():
    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip"):
        print("SKIP: the NAT matrix needs root, ip and iptables (network namespaces)")
        return 77
    w = World()
    try:
        w.build()
        ca = os.path.join(w.work, "ca")
        subprocess.run([WEFT, "ca", "init", "--trust-domain", "netsim.test", "--out", ca],
                       check=True, capture_output=True)
        data = os.path.join(w.work, "control")
        w.spawn(PUB, [WEFT, "control", "--ca", ca, "--data-dir", data, "--listen",
                      f"{CONTROL_IP}:8443", "--stun-listen", f"{CONTROL_IP}:3478",
                      "--relay-listen", f"{CONTROL_IP}:8444", "--heartbeat-interval", "1s"],
                "control.log")
        wait_for("control's token", lambda: os.path.exists(os.path.join(data, "admin.token")))
        token = open(os.path.join(data, "admin.token")).read().strip()
        key = wait_for("a join key", lambda: subprocess.run(
            [WEFT, "control", "keys", "create", "--data-dir", data, "--reusable", "--ttl", "1h"],
            capture_output=True, text=True).stdout.strip())
        for n, kind in SITES:
            site = f"{TAG}s{n}"
            w.spawn(site, ["/usr/bin/python3", "-c", ECHO], f"echo{n}.log")
            w.spawn(site, [WEFT, "agent", "--control", f"https://{CONTROL_IP}:8443",
                           "--control-ca", os.path.join(ca, "ca.crt"), "--auth-key", key,
                           "--state", os.path.join(w.work, f"site{n}"), "--name", f"site{n}",
                           "--cluster-id", f"site{n}", "--port", "8081", "--quic-port", "51820",
                           "--hbone-listen", "127.0.0.1:0", "--heartbeat-interval", "1s",
                           "--proxies", f"{7000 + n}:127.0.0.1:7000"], f"agent{n}.log")
        # Every resource may be reached by every node of the mesh.
        for n, _ in SITES:
            wait_for(f"the policy for site{n}", lambda: put_policy_in_pub(ca, token, n),
                     timeout=60, interval=0.5)

        pairs = [(a, b) for i, a in enumerate(SITES) for b in SITES[i + 1:]]
        results = []
        failures = []
        for (na, ka), (nb, kb) in pairs:
            start = time.time()
            try:
                wait_for(f"site{na} -> site{nb} echo",
                         lambda: echo_in(f"{TAG}s{na}", 7000 + nb, f"hello{na}{nb}"), timeout=60,
                         interval=0.2)
            except AssertionError as e:
                failures.append(f"site{na}({KIND_NAMES[ka]}) -> site{nb}({KIND_NAMES[kb]}): {e}")
                results.append((na, ka, nb, kb, "NO DATA", None))
                continue
            want_direct = expected_direct(ka, kb)
            direct_at = None
            end = time.time() + (3.0 if want_direct else 4.0)
            while time.time() < end:
                if peer_path(f"{TAG}s{na}", f"site{nb}") == "direct":
                    direct_at = time.time() - start
                    break
                time.sleep(0.05)  # polling interval
            path = "direct" if direct_at is not None else peer_path(f"{TAG}s{na}", f"site{nb}")
            results.append((na, ka, nb, kb, path, direct_at))
            if want_direct and direct_at is None:
                failures.append(f"site{na}({KIND_NAMES[ka]}) -> site{nb}({KIND_NAMES[kb]}): "
                                f"expected direct within 3 s, path is {path}")
            if not want_direct and path != "relay":
                failures.append(f"site{na}({KIND_NAMES[ka]}) -> site{nb}({KIND_NAMES[kb]}): "
                                f"expected the relay, path is {path}")
            # Traffic keeps flowing on whatever path it is.
            if not echo_in(f"{TAG}s{na}", 7000 + nb, "again"):
                failures.append(f"site{na} -> site{nb}: second round trip failed on {path}")

        print()
        print(f"{'pair':34} {'expected':9} {'path':8} time to direct")
        for na, ka, nb, kb, path, t in results:
            label = f"site{na} ({KIND_NAMES[ka]}) - site{nb} ({KIND_NAMES[kb]})"
            want = "direct" if expected_direct(ka, kb) else "relay"
            print(f"{label:34} {want:9} {path or '-':8} {f'{t:.2f} s' if t else '-'}")

        # Every agent that looked for a direct path offered its addresses over the relay
        # (call-me-maybe), and the peers received them.
        sent = received = 0
        for n, _ in SITES:
            m = sh("curl", "-s", "-m", "2", "http://127.0.0.1:8081/metrics", ns=f"{TAG}s{n}",
                   capture=True, check=False)
            for line in m.splitlines():
                if line.startswith("weft_p2p_calls_me_maybe_sent_total "):
                    sent += int(float(line.split()[1]))
                if line.startswith("weft_p2p_calls_me_maybe_received_total "):
                    received += int(float(line.split()[1]))
        print(f"call-me-maybe: {sent} offers sent, {received} received")
        if sent == 0 or received == 0:
            failures.append(f"call-me-maybe: {sent} offers sent, {received} received")

        failures += cut_and_restore(w)
        failures += mtu_black_hole(w)
        if failures:
            print("\nFAIL:\n  " + "\n  ".join(failures))
            for f in sorted(os.listdir(w.work)):
                if f.endswith(".log") and f.startswith("agent"):
                    tail = open(os.path.join(w.work, f)).read().splitlines()[-15:]
                    print(f"--- {f}\n" + "\n".join(tail))
            return 1
        print("\nPASS: every pair carried data; direct and relay as expected; a cut direct "
              "path fell back to the relay without losing the stream and came back; a path that "
              "stopped carrying full-size datagrams went on with smaller ones")
        return 0
    finally:
        w.teardown()


def put_policy_in_pub(ca, token, n):
    r = subprocess.run(
        ["ip", "netns", "exec", PUB, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "--cacert", os.path.join(ca, "ca.crt"), "-H", f"Authorization: Bearer {token}", "-X",
         "PUT", f"https://{CONTROL_IP}:8443/v1/policies/p{n}", "-d",
         json.dumps({"service": f"proxy-{7000 + n}", "allow": ["*"]})],
        capture_output=True, text=True)
    return r.stdout == "200"


def echo_stream(ns, port, size, pause):
    """A client in `ns` that sends numbered messages of `size` bytes to the echo service on
    `port` and checks each echo, forever. Returns the process and a list that gets the time of
    every echoed message."""
    code = ("import socket,sys,time\n"
            f"s=socket.create_connection(('127.0.0.1',{port}),timeout=20)\n"
            f"n=0\nwhile True:\n  m=('%08d'%n).encode()*{max(1, size // 8)}\n  s.sendall(m)\n"
            "  d=b''\n  while len(d)<len(m):\n    c=s.recv(len(m)-len(d))\n"
            "    if not c: sys.exit('closed at %d'%n)\n    d+=c\n"
            "  if d!=m: sys.exit('mismatch')\n  n+=1\n  print(n,flush=True)\n"
            f"  time.sleep({pause})\n")
    stream = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counts = []
    threading.Thread(target=lambda: [counts.append(time.time()) for _ in stream.stdout],
                     daemon=True).start()
    return stream, counts


def cut_and_restore(w):
    """Site 1 (no NAT) to site 2 (EIM/EIF): a stream runs while UDP between them is dropped,
    then allowed again."""
    failures = []
    a = f"{TAG}s1"
    peer_ip = "198.18.0.12"
    stream, counts = echo_stream(a, 7002, size=8, pause=0.05)
    try:
        wait_for("the stream to run", lambda: len(counts) > 5, timeout=15)
        rules = [["-I", "OUTPUT", "-p", "udp", "-d", peer_ip, "-j", "DROP"],
                 ["-I", "INPUT", "-p", "udp", "-s", peer_ip, "-j", "DROP"]]
        for r in rules:
            sh("iptables", "-w", *r, ns=a)
        cut = time.time()
        try:
            wait_for("site1 to fall back to the relay", lambda: peer_path(a, "site2") == "relay",
                     timeout=15)
            on_relay = time.time() - cut
            before = len(counts)
            wait_for("the stream to continue over the relay", lambda: len(counts) > before + 10,
                     timeout=20)
            # The stream's longest silence across the cut: what an application notices.
            around = [t for t in counts if t >= cut - 1]
            stall = max(b - a for a, b in zip(around, around[1:]))
            print(f"\ncut: site1 - site2 on the relay after {on_relay:.2f} s; "
                  f"the stream stalled {stall:.2f} s at most")
            # Failover within seconds (iroh users report 30 s); QUIC and the probes notice the
            # loss in well under one.
            if on_relay > 3 or stall > 3:
                failures.append(f"failover too slow: relay after {on_relay:.2f} s, "
                                f"stream stalled {stall:.2f} s")
        except AssertionError as e:
            failures.append(f"cut direct path: {e}")
        for r in rules:
            sh("iptables", "-w", "-D", *r[1:], ns=a)
        restored = time.time()
        try:
            wait_for("site1 back to direct", lambda: peer_path(a, "site2") == "direct",
                     timeout=40)
            print(f"restore: site1 - site2 direct again after {time.time() - restored:.1f} s")
            before = len(counts)
            wait_for("the stream to continue", lambda: len(counts) > before + 10, timeout=20)
        except AssertionError as e:
            failures.append(f"restore direct path: {e}")
        if stream.poll() is not None:
            failures.append(f"the stream broke: {stream.stderr.read().strip()}")
    finally:
        stream.kill()
    return failures


def mtu_black_hole(w):
    """Site 1 to site 2, direct: the path carries full-size QUIC datagrams (a padded ping proved
    it), then site 2's router link shrinks to an MTU of 1300 and the router's ICMP
    "fragmentation needed" is dropped (a path MTU black hole, the worst case). A bulk stream must
    go on, in smaller datagrams, and the full size must come back once the path carries it.
    (An iptables length match would not do: it sees a GSO batch before it is cut into
    datagrams.)"""
    failures = []
    a, router = f"{TAG}s1", f"{TAG}r2"
    try:
        wait_for("site1's direct path to carry full-size datagrams",
                 lambda: peer_path(a, "site2") == "direct" and peer_datagram(a, "site2") == 1452,
                 timeout=20)
    except AssertionError as e:
        return [f"full-size datagrams: {e} (max_datagram {peer_datagram(a, 'site2')})"]
    stream, counts = echo_stream(a, 7002, size=16384, pause=0)
    no_icmp = ["OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"]
    try:
        wait_for("the bulk stream to run", lambda: len(counts) > 20, timeout=15)
        sh("iptables", "-w", "-I", *no_icmp, ns=router)
        sh("ip", "link", "set", "lan", "mtu", "1300", ns=router)
        try:
            wait_for("QUIC's minimum datagram on the shrunken path",
                     lambda: peer_datagram(a, "site2") == 1200, timeout=15)
            before = len(counts)
            wait_for("the bulk stream to go on in smaller datagrams",
                     lambda: len(counts) > before + 20, timeout=20)
            print(f"\nmtu: site1 - site2 on {peer_path(a, 'site2')} with 1200-byte datagrams; "
                  "the bulk stream went on")
        except AssertionError as e:
            failures.append(f"path MTU black hole: {e}")
        sh("ip", "link", "set", "lan", "mtu", "1500", ns=router)
        sh("iptables", "-w", "-D", *no_icmp, ns=router)
        try:
            wait_for("full-size datagrams again", lambda: peer_datagram(a, "site2") == 1452,
                     timeout=20)
        except AssertionError as e:
            failures.append(f"path MTU restored: {e}")
        if stream.poll() is not None:
            failures.append(f"the bulk stream broke: {stream.stderr.read().strip()}")
    finally:
        stream.kill()
    return failures


if __name__ == "__main__":
    sys.exit(main())
