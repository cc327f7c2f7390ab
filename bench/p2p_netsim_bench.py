#!/usr/bin/python3
"""Cross-site throughput and latency in the netsim topology, one run, side by side.

Two sites on a simulated internet segment (network namespaces, veth, MTU 1500), control and a
Nebula lighthouse in the "public" namespace. Measured from site 1 to site 2:
  - direct: iperf3 straight to site 2, no tunnel;
  - Nebula (Debian's nebula, tun MTU 1420 so its packets on the wire match Weft's QUIC size);
  - Weft, direct P2P path: iperf3 through site 1's import of site 2's resource (one stream of
    the agents' QUIC connection, hole punched; the agents serve the import themselves);
  - Weft, relay path: the same through a second pair of agents with --p2p-paths relay-only;
  - time to first byte (a fresh connection's first echo, cold = no QUIC connection yet, and
    warm) and time to direct.
Needs root (namespaces, tun). Prints a markdown table; exit 77 when it cannot run.
usage: bench/p2p_netsim_bench.py path/to/weft [seconds]
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "netsim"))
import nat_matrix as net  # noqa: E402  (the World, its namespaces and helpers)

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
SECS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ROUNDS = int(os.environ.get("BENCH_P2P_ROUNDS", "3"))
net.WEFT = WEFT
net.SITES = [(1, 1), (2, 1)]  # two sites on the public segment: every path is possible
S1, S2 = f"{net.TAG}s1", f"{net.TAG}s2"
S2_IP = "198.18.0.102"


def log(msg):
    print(f"[p2p-bench] {msg}", file=sys.stderr, flush=True)


def iperf(ns, host, port):
    r = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-J", "-c", host, "-p", str(port),
                        "-t", str(SECS)], capture_output=True, text=True, timeout=SECS + 30)
    try:
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        log(f"iperf3 to {host}:{port} failed: {r.stdout[-300:]} {r.stderr[-300:]}")
        return None


def listening(ns, port):
    out = net.sh("ss", "-Hltn", f"sport = :{port}", ns=ns, capture=True, check=False)
    return bool(out.strip())


def first_byte_ms(ns, port):
    """Connect, send, read the echo: milliseconds, from inside the namespace."""
    code = ("import socket,time,sys\nt=time.perf_counter()\n"
            f"s=socket.create_connection(('127.0.0.1',{port}),timeout=10)\n"
            "s.sendall(b'x')\nd=s.recv(1)\nsys.stdout.write('%.2f' % ((time.perf_counter()-t)*1e3) "
            "if d==b'x' else 'fail')")
    r = subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code],
                       capture_output=True, text=True, timeout=20)
    try:
        return float(r.stdout)
    except ValueError:
        return None


def start_nebula(w):
    d = os.path.join(w.work, "nebula")
    os.makedirs(d)
    nc = ["nebula-cert"]
    subprocess.run(nc + ["ca", "-name", "bench", "-out-crt", f"{d}/ca.crt", "-out-key",
                         f"{d}/ca.key"], check=True, capture_output=True)
    hosts = [("lh", "10.99.0.1", net.PUB, None), ("n1", "10.99.0.2", S1, "198.18.0.101"),
             ("n2", "10.99.0.3", S2, S2_IP)]
    for name, ip, ns, _ in hosts:
        subprocess.run(nc + ["sign", "-ca-crt", f"{d}/ca.crt", "-ca-key", f"{d}/ca.key", "-name",
                             name, "-ip", f"{ip}/24", "-out-crt", f"{d}/{name}.crt", "-out-key",
                             f"{d}/{name}.key"], check=True, capture_output=True)
        lighthouse = name == "lh"
        cfg = {
            "pki": {"ca": f"{d}/ca.crt", "cert": f"{d}/{name}.crt", "key": f"{d}/{name}.key"},
            "static_host_map": {"10.99.0.1": [f"{net.CONTROL_IP}:4242"]},
            "lighthouse": {"am_lighthouse": lighthouse, "interval": 60,
                           "hosts": [] if lighthouse else ["10.99.0.1"]},
            "listen": {"host": "0.0.0.0", "port": 4242},
            "punchy": {"punch": True},
            "tun": {"disabled": lighthouse, "dev": "neb1", "mtu": 1420},
            "logging": {"level": "info"},
            "firewall": {"outbound": [{"port": "any", "proto": "any", "host": "any"}],
                         "inbound": [{"port": "any", "proto": "any", "host": "any"}]},
        }
        path = f"{d}/{name}.yml"
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        w.spawn(ns, ["nebula", "-config", path], f"nebula-{name}.log")
    # A TCP connect to site 2's iperf3 over the tunnel (the image may have no ping).
    code = "import socket; socket.create_connection(('10.99.0.3', 5201), timeout=1).close()"
    reach = lambda: subprocess.run(["ip", "netns", "exec", S1, "/usr/bin/python3", "-c", code],
                                   capture_output=True).returncode == 0
    net.wait_for("Nebula's tunnel from site 1 to site 2", reach, timeout=30, interval=0.5)


def start_agents(w, ca, key, token, suffix, extra, api_port, quic_port, ports):
    for n in (1, 2):
        args = [WEFT, "agent", "--control", f"https://{net.CONTROL_IP}:8443", "--control-ca",
                os.path.join(ca, "ca.crt"), "--auth-key", key, "--state",
                os.path.join(w.work, f"site{n}{suffix}"), "--name", f"site{n}{suffix}",
                "--cluster-id", f"site{n}{suffix}", "--port", str(api_port), "--quic-port",
                str(quic_port), "--hbone-listen", "127.0.0.1:0", "--heartbeat-interval", "1s"]
        if n == 2:
            args += ["--proxies", f"{ports['echo']}:127.0.0.1:7000,{ports['iperf']}:127.0.0.1:5201"]
        w.spawn(f"{net.TAG}s{n}", args + extra, f"agent{n}{suffix}.log")
    # Only this pair's client may import them: another agent in site 1 must not listen too.
    for svc in (ports["echo"], ports["iperf"]):
        net.wait_for(f"the policy for {svc}", lambda: put_policy(ca, token, svc, f"site1{suffix}"),
                     timeout=60, interval=0.5)


def put_policy(ca, token, port, client_cluster):
    r = subprocess.run(
        ["ip", "netns", "exec", net.PUB, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "--cacert", os.path.join(ca, "ca.crt"), "-H", f"Authorization: Bearer {token}", "-X",
         "PUT", f"https://{net.CONTROL_IP}:8443/v1/policies/p{port}", "-d",
         json.dumps({"service": f"proxy-{port}",
                     "allow": [f"spiffe://bench.test/cluster/{client_cluster}/*"]})],
        capture_output=True, text=True)
    return r.stdout == "200"


def peer_status(api_port, peer):
    out = net.sh("curl", "-s", "-m", "2", f"http://127.0.0.1:{api_port}/status", ns=S1,
                 capture=True, check=False)
    try:
        for p in (json.loads(out).get("p2p") or {}).get("peers", []):
            if p.get("name") == peer:
                return p
    except ValueError:
        pass
    return {}


def peer_path(api_port, peer):
    return peer_status(api_port, peer).get("path")


def weft_pair(w, ca, key, token, label, suffix, extra, api_port, quic_port, ports):
    """Starts a pair, then: cold and warm first byte, time to direct. iperf3 runs later, in
    rounds with the other paths."""
    res = {}
    start_agents(w, ca, key, token, suffix, extra, api_port, quic_port, ports)
    net.wait_for(f"{label}: site 1's import", lambda: listening(S1, ports["echo"]), timeout=60,
                 interval=0.05)
    t0 = time.time()
    res["ttfb_cold_ms"] = first_byte_ms(S1, ports["echo"])
    if "relay-only" not in extra:
        try:
            net.wait_for("the direct path", lambda: peer_path(api_port, f"site2{suffix}") == "direct",
                         timeout=10, interval=0.02)
            res["to_direct_s"] = time.time() - t0
        except AssertionError:
            res["to_direct_s"] = None
    res["ttfb_warm_ms"] = min(filter(None, (first_byte_ms(S1, ports["echo"]) for _ in range(5))),
                              default=None)
    res["path"] = peer_path(api_port, f"site2{suffix}")
    net.wait_for(f"{label}: site 1's iperf import", lambda: listening(S1, ports["iperf"]),
                 timeout=30, interval=0.05)
    return res


def run():
    if os.geteuid() != 0 or not shutil.which("nebula") or not shutil.which("iperf3"):
        print("SKIP: the P2P netsim benchmark needs root, nebula and iperf3")
        return None
    w = net.World()
    try:
        w.build()
        ca = os.path.join(w.work, "ca")
        subprocess.run([WEFT, "ca", "init", "--trust-domain", "bench.test", "--out", ca],
                       check=True, capture_output=True)
        data = os.path.join(w.work, "control")
        w.spawn(net.PUB, [WEFT, "control", "--ca", ca, "--data-dir", data, "--listen",
                          f"{net.CONTROL_IP}:8443", "--stun-listen", f"{net.CONTROL_IP}:3478",
                          "--relay-listen", f"{net.CONTROL_IP}:8444", "--heartbeat-interval", "1s"],
                "control.log")
        net.wait_for("control's token", lambda: os.path.exists(os.path.join(data, "admin.token")))
        token = open(os.path.join(data, "admin.token")).read().strip()
        key = net.wait_for("a join key", lambda: subprocess.run(
            [WEFT, "control", "keys", "create", "--data-dir", data, "--reusable", "--ttl", "1h"],
            capture_output=True, text=True).stdout.strip())
        w.spawn(S2, ["iperf3", "-s", "-p", "5201"], "iperf3.log")
        w.spawn(S2, ["/usr/bin/python3", "-c", net.ECHO], "echo.log")
        net.wait_for("iperf3 in site 2", lambda: listening(S2, 5201))
        rows = {"direct, no tunnel": {}}
        log("Nebula: starting")
        start_nebula(w)
        rows["Nebula 1.6 (Debian)"] = {}
        log("Weft direct: starting")
        rows["Weft, P2P QUIC direct"] = weft_pair(w, ca, key, token, "Weft direct", "", [], 8081,
                                                  51820, {"echo": 7002, "iperf": 5202})
        log("Weft relay: starting")
        rows["Weft, P2P QUIC via relay"] = weft_pair(
            w, ca, key, token, "Weft relay", "r", ["--p2p-paths", "relay-only"], 8082, 51821,
            {"echo": 7012, "iperf": 5212})
        # Throughput in rounds, one path after another, so the VM's slow spells fall on every
        # path alike; the report takes each path's median and lists every round.
        targets = {"direct, no tunnel": (S2_IP, 5201, None), "Nebula 1.6 (Debian)": ("10.99.0.3", 5201, None),
                   "Weft, P2P QUIC direct": ("127.0.0.1", 5202, (8081, "site2")),
                   "Weft, P2P QUIC via relay": ("127.0.0.1", 5212, (8082, "site2r"))}
        for rnd in range(ROUNDS):
            for name, (host, port, agent) in targets.items():
                log(f"{name}: iperf3 {SECS}s, round {rnd + 1}/{ROUNDS}")
                gbps = iperf(S1, host, port)
                rows[name].setdefault("each", []).append(gbps)
                if agent:  # the peer as the agent sees it, to explain an odd round
                    st = peer_status(*agent)
                    log(f"{name}: {fmt(gbps)} Gbit/s; peer " + json.dumps(
                        {k: st.get(k) for k in ("path", "max_datagram", "rtt_ms", "cwnd_bytes",
                                                "delivery_mbit_s", "path_changes")}))
        for r in rows.values():
            each = [g for g in r["each"] if g is not None]
            r["gbps"] = sorted(each)[len(each) // 2] if each else None
        rows["Weft, P2P QUIC direct"]["path_after"] = peer_path(8081, "site2")
        return rows
    finally:
        w.teardown()


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def report(rows):
    if rows is None:
        return "\n### P2P across sites (netsim)\n\nSKIP: needs root, nebula and iperf3.\n"
    direct = rows["direct, no tunnel"]["gbps"]
    neb = rows["Nebula 1.6 (Debian)"]["gbps"]
    lines = ["", f"### P2P across sites (netsim: namespaces, veth MTU 1500, {SECS}s iperf3, 1 stream)",
             "", f"Gbit/s is the median of {ROUNDS} rounds taken path after path; every round is listed.",
             "", "| path | Gbit/s | each round | vs direct | vs Nebula | first byte, cold ms | first byte, warm ms | time to direct s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        g = r.get("gbps")
        each = ", ".join(fmt(x) for x in r.get("each", []))
        lines.append(f"| {name} | {fmt(g)} | {each} | {fmt(g and direct and g / direct)} | "
                     f"{fmt(g and neb and g / neb)} | {fmt(r.get('ttfb_cold_ms'), '{:.1f}')} | "
                     f"{fmt(r.get('ttfb_warm_ms'), '{:.2f}')} | {fmt(r.get('to_direct_s'))} |")
    wd = rows["Weft, P2P QUIC direct"]
    wr = rows["Weft, P2P QUIC via relay"]
    checks = [("Weft direct ≥ 3× Nebula", wd["gbps"] and neb and wd["gbps"] / neb, lambda x: x >= 3, "{:.2f}×"),
              ("Weft direct ≥ 2 Gbit/s", wd["gbps"], lambda x: x >= 2, "{:.2f} Gbit/s"),
              ("relay ≥ 1 Gbit/s", wr["gbps"], lambda x: x >= 1, "{:.2f} Gbit/s"),
              ("time to direct ≤ 2 s", wd.get("to_direct_s"), lambda x: x <= 2, "{:.2f} s")]
    if wd.get("path_after") != "direct":
        lines += ["", f"The direct pair's path after the rounds: {wd.get('path_after')} (expected direct)."]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for label, v, ok, f in checks:
        lines.append(f"| {label} | {fmt(v, f)} | {'n/a' if v is None else ('yes' if ok(v) else 'NO')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = report(run())
    print(text)
    sys.exit(0)
