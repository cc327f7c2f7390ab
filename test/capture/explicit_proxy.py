#!/usr/bin/python3
"""The explicit proxy (SOCKS5 and HTTP, one port) with curl as the client, on loopback.

A mesh service `web` (names `web.mesh:80`) is served by a second proxy over HBONE in front of a
Python HTTP origin. Asserts that curl reaches it by name through --socks5-hostname, through
--proxy (absolute URI) and --proxytunnel (CONNECT); that an IP destination goes out as egress;
and, on a second proxy with users and egress denied, that username/password is enforced for
SOCKS5 and CONNECT, that egress is refused with the right answers, and that garbage on the
port gets a 400 without hurting the proxy.
usage: explicit_proxy.py path/to/weft
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
HELLO = "hello from the origin\n"

HTTP = r"""
import http.server, os, sys
os.chdir(sys.argv[1])
s = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def wait_for(what, fn, timeout=20.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def main():
    if not shutil.which("curl"):
        print("SKIP: curl missing (scripts/install-deps)")
        return 77
    work = tempfile.mkdtemp(prefix="weft-explicit-")
    procs, failures = [], []

    def spawn(args, log):
        p = subprocess.Popen([str(a) for a in args], stdout=open(os.path.join(work, log), "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    def start_proxy(name, yaml):
        cfg = os.path.join(work, f"{name}.yaml")
        open(cfg, "w").write(yaml)
        admin_file = os.path.join(work, f"{name}.admin")
        spawn([WEFT, "proxy", "-c", cfg, "--admin-address-path", admin_file], f"{name}.log")
        wait_for(f"{name}'s admin address", lambda: os.path.exists(admin_file))
        admin = open(admin_file).read().strip()

        def listeners():
            r = subprocess.run(["curl", "-s", f"http://{admin}/listeners"], capture_output=True,
                               text=True)
            try:
                return json.loads(r.stdout)
            except ValueError:
                return None
        return wait_for(f"{name}'s listeners", listeners)

    def curl(*args):
        r = subprocess.run(["curl", "-s", "-m", "5", *args], capture_output=True, text=True)
        return r.stdout

    def log_lines(name):
        return [json.loads(l) for l in open(os.path.join(work, f"{name}.log")) if l.startswith("{")]

    try:
        ca = os.path.join(work, "ca")
        subprocess.run([WEFT, "ca", "init", "--trust-domain", "capture.test", "--out", ca],
                       check=True, capture_output=True)
        for who in ("client", "server"):
            subprocess.run([WEFT, "cert", "issue", "--ca", ca, "--spiffe-id",
                            f"spiffe://capture.test/ns/default/sa/{who}", "--out",
                            os.path.join(work, who)], check=True, capture_output=True)
        site = os.path.join(work, "www")
        os.makedirs(site)
        open(os.path.join(site, "hello.txt"), "w").write(HELLO)
        origin = spawn(["/usr/bin/python3", "-c", HTTP, site], "origin.log")
        port = int(wait_for("the origin's port",
                            lambda: open(os.path.join(work, "origin.log")).readline().strip()))

        def identity(who):
            d = os.path.join(work, who)
            return f"identity: {{cert: {d}/cert.pem, key: {d}/key.pem, ca: {d}/ca.crt}}\n"

        server = start_proxy("server", identity("server") +
                             "admin: {listen: 127.0.0.1:0}\ninbound:\n  listen: 127.0.0.1:0\n"
                             f"  targets:\n    - {{authority: 'web:80', address: '127.0.0.1:{port}'}}\n")
        hbone = server["inbound"]
        service = (f"services:\n  - name: web\n    addresses: ['{hbone}']\n    authority: 'web:80'\n"
                   "    spiffe_ids: ['spiffe://capture.test/ns/default/sa/server']\n"
                   "    destinations: ['web.mesh:80']\n")
        open_proxy = start_proxy("open", identity("client") + "admin: {listen: 127.0.0.1:0}\n" +
                                 service + "capture:\n  explicit: 127.0.0.1:0\n")["capture/explicit"]
        url = "http://web.mesh/hello.txt"
        check(curl("--socks5-hostname", open_proxy, url) == HELLO, "SOCKS5 (socks5h) by name to the mesh")
        check(curl("--proxy", f"http://{open_proxy}", url) == HELLO, "HTTP proxy, absolute URI, to the mesh")
        check(curl("--proxytunnel", "--proxy", f"http://{open_proxy}", url) == HELLO,
              "HTTP CONNECT to the mesh")
        direct = f"http://127.0.0.1:{port}/hello.txt"
        check(curl("--socks5", open_proxy, direct) == HELLO, "SOCKS5 by address: egress")
        check(curl("--proxy", f"http://{open_proxy}", direct) == HELLO, "HTTP proxy by address: egress")
        mesh_lines = lambda: [l for l in log_lines("open") if l.get("upstream") == "web"]
        lines = wait_for("three mesh log lines", lambda: len(mesh_lines()) >= 3 and mesh_lines())
        check(all(l["peer_identity"] == "spiffe://capture.test/ns/default/sa/server" for l in lines)
              and {l["protocol"] for l in lines} == {"socks5", "http-proxy", "http-connect"},
              f"mesh requests logged with the peer identity and how they came: "
              f"{sorted({l['protocol'] for l in lines})}")

        locked = start_proxy("locked", identity("client") + "admin: {listen: 127.0.0.1:0}\n" +
                             service + "capture:\n  explicit: 127.0.0.1:0\n  egress: deny\n"
                             "  users: [{name: alice, password: s3cret}]\n")["capture/explicit"]
        check(curl("--socks5-hostname", f"alice:s3cret@{locked}", url) == HELLO,
              "SOCKS5 with username/password")
        check(curl("--socks5-hostname", f"alice:wrong@{locked}", url) == "", "a wrong password is refused")
        check(curl("--socks5-hostname", locked, url) == "", "no credentials: refused")
        check(curl("--socks5", f"alice:s3cret@{locked}", direct) == "", "egress denied over SOCKS5")
        check(curl("--proxytunnel", "--proxy", f"http://alice:s3cret@{locked}", url) == HELLO,
              "CONNECT with Proxy-Authorization")
        code = curl("-o", "/dev/null", "-w", "%{http_code}", "--proxy", f"http://{locked}", url)
        check(code == "407", f"absolute URI without credentials: 407 (got {code})")
        check(curl("--proxy", f"http://alice:s3cret@{locked}", url) == HELLO,
              "absolute URI with Proxy-Authorization (stripped before the origin)")
        code = curl("-o", "/dev/null", "-w", "%{http_connect}", "--proxytunnel", "--proxy",
                    f"http://alice:s3cret@{locked}", direct)
        check(code == "403", f"egress denied over CONNECT: 403 (got {code})")
        results = {l.get("result", "").split(":")[0] for l in log_lines("locked")}
        check({"socks5_auth_failed", "socks5_auth_required", "egress_denied",
               "http_proxy_auth_required"} <= results, f"refusals logged with reasons: {sorted(results)}")

        # Garbage: an answer saying what is wrong, and the proxy carries on.
        host, p = open_proxy.rsplit(":", 1)
        with socket.create_connection((host, int(p)), timeout=5) as s:
            s.sendall(b"\x16\x03\x01garbage that is no proxy request\r\n\r\n")
            answer = s.recv(200)
        check(answer.startswith(b"HTTP/1.1 400"), f"garbage gets a 400: {answer[:40]!r}")
        check(curl("--socks5-hostname", open_proxy, url) == HELLO, "the proxy still serves after garbage")
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
        if failures:
            for f in ("open.log", "locked.log", "server.log"):
                path = os.path.join(work, f)
                if os.path.exists(path):
                    print(f"--- {f}\n" + "".join(open(path).readlines()[-15:]))
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"\nFAIL: {len(failures)} check(s)")
        return 1
    print("\nPASS: the explicit proxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
