#!/usr/bin/python3
"""PostgreSQL through the mesh: a real server (Debian's postgresql, initdb in a temp dir), a
`weft proxy` in front of it serving HBONE, and a client-side proxy whose outbound listener psql
and pgbench use. Asserts that a query answers, that pgbench initialises and runs with no
failed transaction, and that both proxies logged the tunnel with each other's identity.
Prints pgbench's tps (a functional run, not a benchmark). SKIP (77) without PostgreSQL.
usage: postgres_mesh.py path/to/weft
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"


def wait_for(what, fn, timeout=30.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def unused_port():
    # PostgreSQL cannot take port 0: a port the OS just handed out and we released.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or not shutil.which("psql") or not shutil.which("pgbench"):
        print("SKIP: PostgreSQL (initdb, psql, pgbench) is not installed: scripts/install-deps")
        return 77
    pgbin = os.path.dirname(bins[-1])
    work = tempfile.mkdtemp(prefix="weft-pg-")
    os.chmod(work, 0o755)
    procs, failures = [], []
    # PostgreSQL refuses to run as root: the server runs as nobody then.
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []

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

    try:
        data = os.path.join(work, "pgdata")
        os.makedirs(data)
        if as_user:
            os.chown(data, 65534, 65534)
        r = subprocess.run(as_user + [f"{pgbin}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                                      "--no-sync"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr}")
        pg_port = unused_port()
        spawn(as_user + [f"{pgbin}/postgres", "-D", data, "-p", str(pg_port), "-c",
                         "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
                         "-c", "fsync=off"], "postgres.log")
        wait_for("PostgreSQL to accept connections", lambda: subprocess.run(
            [f"{pgbin}/pg_isready", "-h", "127.0.0.1", "-p", str(pg_port)],
            capture_output=True).returncode == 0)

        ca = os.path.join(work, "ca")
        subprocess.run([WEFT, "ca", "init", "--trust-domain", "pg.test", "--out", ca], check=True,
                       capture_output=True)
        for who in ("app", "db"):
            subprocess.run([WEFT, "cert", "issue", "--ca", ca, "--spiffe-id",
                            f"spiffe://pg.test/ns/default/sa/{who}", "--out",
                            os.path.join(work, who)], check=True, capture_output=True)

        def identity(who):
            d = os.path.join(work, who)
            return f"identity: {{cert: {d}/cert.pem, key: {d}/key.pem, ca: {d}/ca.crt}}\n"

        server = start_proxy("db-proxy", identity("db") + "admin: {listen: 127.0.0.1:0}\n"
                             "inbound:\n  listen: 127.0.0.1:0\n  targets:\n"
                             f"    - {{authority: 'db:5432', address: '127.0.0.1:{pg_port}', "
                             "allow: ['spiffe://pg.test/ns/default/sa/app']}\n")
        client = start_proxy("app-proxy", identity("app") + "admin: {listen: 127.0.0.1:0}\n"
                             f"services:\n  - name: db\n    addresses: ['{server['inbound']}']\n"
                             "    authority: 'db:5432'\n"
                             "    spiffe_ids: ['spiffe://pg.test/ns/default/sa/db']\n"
                             "outbound:\n  - {name: db, listen: 127.0.0.1:0, service: db}\n")
        port = client["outbound/db"].rsplit(":", 1)[1]
        conn = ["-h", "127.0.0.1", "-p", port, "-U", "postgres"]
        r = subprocess.run(["psql", *conn, "-tAc", "select 6 * 7"], capture_output=True, text=True,
                           timeout=30)
        check(r.stdout.strip() == "42", f"psql through the mesh: {r.stdout.strip() or r.stderr.strip()}")
        r = subprocess.run(["pgbench", *conn, "-i", "-s", "1", "-q", "postgres"], capture_output=True,
                           text=True, timeout=120)
        check(r.returncode == 0, f"pgbench -i through the mesh: {r.stderr.strip()[-200:]}")
        r = subprocess.run(["pgbench", *conn, "-c", "4", "-j", "2", "-T", "3", "postgres"],
                           capture_output=True, text=True, timeout=120)
        tps = re.search(r"tps = ([0-9.]+)", r.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        check(r.returncode == 0 and tps and (not failed or failed.group(1) == "0"),
              f"pgbench 4 clients 3 s through the mesh: "
              f"{'tps ' + tps.group(1) if tps else r.stdout[-300:] + r.stderr[-300:]}")
        lines = [json.loads(l) for l in open(os.path.join(work, "db-proxy.log")) if l.startswith("{")]
        check(any(l.get("peer_identity") == "spiffe://pg.test/ns/default/sa/app" for l in lines),
              "the database's proxy saw the app's identity")
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if failures:
            for f in ("app-proxy.log", "db-proxy.log", "postgres.log"):
                path = os.path.join(work, f)
                if os.path.exists(path):
                    print(f"--- {f}\n" + "".join(open(path).readlines()[-10:]))
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"\nFAIL: {len(failures)} check(s)")
        return 1
    print("\nPASS: PostgreSQL through the mesh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
