#!/usr/bin/python3
"""Transparent capture for real: a network namespace with an address of its own, `weft iptables
install` writing the nat rules, a capturing `weft proxy` (running as root, so its own traffic is
excluded by uid) in front of applications that run as `nobody`, and a second proxy that serves
a mesh service over HBONE.

Asserts that:
  - install is idempotent (the nat table is the same after a second install) and remove
    leaves no trace (twice in a row);
  - an application's plain connection is captured, its original destination recovered
    (SO_ORIGINAL_DST) and sent out of the mesh (egress);
  - an HTTP request whose Host names a mesh service goes over HBONE to that service;
  - a server-first protocol (a banner) is not stalled, on an opaque port and on a port where
    no name-based route exists;
  - a connection dialled to the capture port directly is refused, not looped.
Needs root; prints SKIP and exits 77 otherwise.
usage: capture_netns.py path/to/weft
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
NS = f"wcap{os.getpid() % 100000}"
PEER_NS = NS + "p"  # a client outside the workload, for inbound capture
APP_IP = "192.0.2.1"

BANNER = r"""
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(16)
while True:
    c, _ = s.accept(); c.sendall(b"220 weft-test banner\r\n"); c.close()
"""

HTTP = r"""
import http.server, os, sys
os.chdir(sys.argv[1])
http.server.HTTPServer(("0.0.0.0", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

# Reads a banner as the application would: connect, wait for the server to speak first.
READ_BANNER = r"""
import socket, sys, time
t = time.perf_counter()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
d = s.recv(100)
print("%s %.1f" % (d.decode().strip(), (time.perf_counter() - t) * 1000))
"""


def sh(*args, check=True, ns=NS, as_nobody=False, timeout=30):
    cmd = [str(a) for a in args]
    if as_nobody:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def wait_for(what, fn, timeout=20.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def nat_rules():
    out = sh("iptables-save", "-t", "nat").stdout
    return "\n".join(l for l in out.splitlines() if not l.startswith(("#", ":")) and "COMMIT" not in l)


def main():
    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("setpriv"):
        print("SKIP: the capture test needs root, iptables and setpriv (network namespaces)")
        return 77
    work = tempfile.mkdtemp(prefix="weft-capture-")
    procs = []
    failures = []

    def spawn(args, log):
        out = open(os.path.join(work, log), "w")
        p = subprocess.Popen(["ip", "netns", "exec", NS] + [str(a) for a in args], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        sh("ip", "link", "set", "lo", "up")
        # The workload's address, on a veth whose other end is a peer namespace.
        subprocess.run(["ip", "netns", "add", PEER_NS], check=True)
        sh("ip", "link", "add", "app0", "type", "veth", "peer", "name", "app1")
        sh("ip", "link", "set", "app1", "netns", PEER_NS)
        sh("ip", "addr", "add", f"{APP_IP}/24", "dev", "app0")
        sh("ip", "link", "set", "app0", "up")
        sh("ip", "addr", "add", "192.0.2.2/24", "dev", "app1", ns=PEER_NS)
        sh("ip", "link", "set", "app1", "up", ns=PEER_NS)

        # PKI: a client identity for the capturing proxy, a server identity for the mesh peer.
        ca = os.path.join(work, "ca")
        subprocess.run([WEFT, "ca", "init", "--trust-domain", "capture.test", "--out", ca],
                       check=True, capture_output=True)
        for who in ("client", "server"):
            subprocess.run([WEFT, "cert", "issue", "--ca", ca, "--spiffe-id",
                            f"spiffe://capture.test/ns/default/sa/{who}", "--out",
                            os.path.join(work, who)], check=True, capture_output=True)
        site = os.path.join(work, "www")
        os.makedirs(site)
        open(os.path.join(site, "hello.txt"), "w").write("hello from the origin\n")
        os.chmod(work, 0o755)
        spawn(["/usr/bin/python3", "-c", HTTP, site], "http.log")
        spawn(["/usr/bin/python3", "-c", BANNER, "2525"], "banner-opaque.log")
        spawn(["/usr/bin/python3", "-c", BANNER, "2526"], "banner.log")

        def identity(who):
            d = os.path.join(work, who)
            return (f"identity: {{cert: {d}/cert.pem, key: {d}/key.pem, ca: {d}/ca.crt}}\n")

        server_cfg = os.path.join(work, "server.yaml")
        open(server_cfg, "w").write(
            identity("server") + "admin: {listen: 127.0.0.1:0}\n"
            "inbound:\n  listen: 127.0.0.1:15008\n  targets:\n"
            "    - {authority: 'web:8080', address: '127.0.0.1:8080', "
            "allow: ['spiffe://capture.test/ns/default/sa/client']}\n")
        client_cfg = os.path.join(work, "client.yaml")
        open(client_cfg, "w").write(
            identity("client") + "admin: {listen: 127.0.0.1:0}\n"
            "services:\n  - name: web\n    addresses: ['127.0.0.1:15008']\n"
            "    authority: 'web:8080'\n"
            "    spiffe_ids: ['spiffe://capture.test/ns/default/sa/server']\n"
            "    destinations: ['web.mesh:8080']\n"
            "capture:\n  transparent: 127.0.0.1:15001\n  opaque_ports: [2525]\n"
            "  inbound: 0.0.0.0:15006\n  inbound_plaintext: allow\n")
        for name, cfg in (("server", server_cfg), ("client", client_cfg)):
            spawn([WEFT, "proxy", "-c", cfg, "--admin-address-path",
                   os.path.join(work, f"{name}.admin")], f"{name}.log")
        for name in ("server", "client"):
            path = os.path.join(work, f"{name}.admin")
            wait_for(f"{name}'s admin address", lambda: os.path.exists(path))
            admin = open(path).read().strip()
            wait_for(f"{name} ready", lambda: sh("curl", "-s", "-o", "/dev/null", "-w",
                                                   "%{http_code}", f"http://{admin}/ready",
                                                   check=False).stdout == "200")

        install = [WEFT, "iptables", "install", "--proxy-uid", "0", "--outbound-port", "15001",
                   "--inbound", "--inbound-port", "15006", "--ipv6", "off"]
        sh(*install)
        first = nat_rules()
        sh(*install)
        check(nat_rules() == first, "a second install leaves the same nat rules")
        check("WEFT_OUTPUT" in first and "--to-ports 15001" in first,
              "the rules redirect outbound TCP to 15001")

        def access_log():
            return [json.loads(l) for l in open(os.path.join(work, "client.log"))
                    if l.startswith("{")]

        def last_entry(dest):
            for e in reversed(access_log()):
                if e.get("destination") == dest:
                    return e
            return None

        # Egress: captured, original destination recovered, sent out of the mesh.
        r = sh("curl", "-s", "-m", "5", f"http://{APP_IP}:8080/hello.txt", as_nobody=True,
               check=False)
        check(r.stdout == "hello from the origin\n", f"egress through capture (got {r.stdout!r})")
        e = wait_for("the egress access log line", lambda: last_entry(f"{APP_IP}:8080"))
        check(e.get("upstream") == f"{APP_IP}:8080" and e.get("listener") == "capture/transparent",
              f"the access log shows the original destination and egress: {e}")

        # A Host that names a mesh service goes over HBONE.
        before = len(access_log())
        r = sh("curl", "-s", "-m", "5", "-H", "Host: web.mesh:8080",
               f"http://{APP_IP}:8080/hello.txt", as_nobody=True, check=False)
        check(r.stdout == "hello from the origin\n", f"Host-routed to the mesh (got {r.stdout!r})")
        e = wait_for("the mesh access log line",
                     lambda: next((x for x in access_log()[before:] if x.get("upstream") == "web"),
                                  None))
        check(e.get("peer_identity") == "spiffe://capture.test/ns/default/sa/server"
              and e.get("protocol") == "http/1.1",
              f"routed by Host to service web over mTLS: {e}")

        # Server-first protocols: the banner arrives, detection never waits on them.
        for port, proto in ((2525, "tcp (opaque port)"), (2526, "tcp")):
            r = sh("/usr/bin/python3", "-c", READ_BANNER, APP_IP, port, as_nobody=True, check=False)
            check(r.stdout.startswith("220 weft-test banner"),
                  f"banner on {port} through capture: {r.stdout.strip() or r.stderr.strip()}")
            e = wait_for(f"the access log line for {port}", lambda: last_entry(f"{APP_IP}:{port}"))
            check(e.get("protocol") == proto, f"port {port} went as '{proto}': {e.get('protocol')}")

        # Inbound: a client in the peer namespace reaches the workload through 15006.
        r = sh("curl", "-s", "-m", "5", f"http://{APP_IP}:8080/hello.txt", ns=PEER_NS, check=False)
        check(r.stdout == "hello from the origin\n", f"inbound plaintext through 15006 (got {r.stdout!r})")
        e = wait_for("the inbound access log line",
                     lambda: next((x for x in reversed(access_log())
                                   if x.get("listener") == "capture/inbound"), None))
        check(e.get("destination") == f"{APP_IP}:8080" and e.get("direction") == "inbound",
              f"inbound capture logged with its original destination: {e}")

        # Dialled directly (as root: not redirected): refused, never looped to itself.
        r = sh("/usr/bin/python3", "-c", READ_BANNER, "127.0.0.1", 15001, check=False)
        e = wait_for("the direct-dial access log line",
                     lambda: next((x for x in reversed(access_log())
                                   if x.get("result", "").startswith("no_original_destination")),
                                  None))
        check(e is not None, "a direct connection to the capture port is refused")

        remove = [WEFT, "iptables", "remove", "--ipv6", "off"]
        sh(*remove)
        sh(*remove)
        check("WEFT" not in nat_rules(), "remove (twice) leaves no WEFT rule or chain")
        r = sh("curl", "-s", "-m", "5", f"http://{APP_IP}:8080/hello.txt", as_nobody=True,
               check=False)
        check(r.stdout == "hello from the origin\n", "traffic flows straight once removed")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)
        if failures:
            for f in ("client.log", "server.log"):
                print(f"--- {f}\n" + "".join(open(os.path.join(work, f)).readlines()[-20:]))
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"\nFAIL: {len(failures)} check(s)")
        return 1
    print("\nPASS: transparent capture in a namespace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
