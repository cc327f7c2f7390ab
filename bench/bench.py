"""Weft benchmark: every path measured in the same run, on this machine, on loopback.

Paths: direct, HAProxy L4, Weft L4, HAProxy mTLS chain, stunnel mTLS chain, Weft mTLS chain.
Measures: iperf3 single-stream throughput; wrk latency at 1 connection (p50, p99) and req/s at
64 connections against a small nginx response; proxy RSS idle and under load; CPU seconds per
1,000 requests; memory per idle tunnelled connection (10,000 idle connections). For L7 also
h2load (HTTP/2) and open-loop latency at fixed request rates (bench/fixed_rate.cc).
Prints a markdown table and writes it to bench/results/."""
import datetime, json, os, re, resource, shutil, socket, subprocess, sys, tempfile, time, urllib.request

WEFT = sys.argv[1]
DURATION = int(os.environ.get("BENCH_SECONDS", "5"))
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", "10000"))
TCK = os.sysconf("SC_CLK_TCK")
work = tempfile.mkdtemp(prefix="weft-bench-")
procs = []


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def start(name, args, **kw):
    p = subprocess.Popen(args, stdout=open(f"{work}/{name}.out", "w"), stderr=open(f"{work}/{name}.err", "w"), **kw)
    procs.append(p)
    return p


def wait_port(port, proc=None, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.02)  # polling interval
    raise SystemExit(f"port {port} not ready")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK


def weft_cmd(*a):
    subprocess.run([WEFT, *a], check=True, capture_output=True)


# ---------------------------------------------------------------- fixtures
def setup_pki():
    weft_cmd("ca", "init", "--trust-domain", "bench.local", "--out", f"{work}/ca")
    for who in ("client", "server"):
        weft_cmd("cert", "issue", "--ca", f"{work}/ca", "--spiffe-id", f"spiffe://bench.local/ns/b/sa/{who}", "--out", f"{work}/{who}")
        with open(f"{work}/{who}/combined.pem", "w") as f:
            f.write(open(f"{work}/{who}/cert.pem").read() + open(f"{work}/{who}/key.pem").read())


def start_backends():
    global NGINX_H2
    ng, NGINX_H2 = free_port(), free_port()
    os.makedirs(f"{work}/nginx", exist_ok=True)
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
worker_rlimit_nofile 20000;
events {{ worker_connections 19000; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 600s; client_header_timeout 600s;
  client_body_temp_path {work}/nginx; proxy_temp_path {work}/nginx; fastcgi_temp_path {work}/nginx;
  uwsgi_temp_path {work}/nginx; scgi_temp_path {work}/nginx;
  server {{ listen 127.0.0.1:{ng} backlog=8192; location / {{ return 200 "hello from nginx\\n"; }}
           location = /status {{ stub_status; }} }}
  server {{ listen 127.0.0.1:{NGINX_H2} http2 backlog=8192;
           location / {{ return 200 "hello from nginx\\n"; }} }} }}
""")
    p = start("nginx", ["nginx", "-c", f"{work}/nginx.conf", "-p", work])
    wait_port(ng, p)
    ip = free_port()
    p = start("iperf3", ["iperf3", "-s", "-p", str(ip), "-1"] if False else ["iperf3", "-s", "-p", str(ip)])
    wait_port(ip, p)
    return ng, ip


def haproxy_l4(ng, ip):
    ports = {"http": free_port(), "iperf": free_port()}
    cfg = f"""global
  nbthread 1
  maxconn 7500
  ulimit-n 20000
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 600s
  timeout server 600s
"""
    for name, target in (("http", ng), ("iperf", ip)):
        cfg += f"frontend f_{name}\n  bind 127.0.0.1:{ports[name]}\n  default_backend b_{name}\nbackend b_{name}\n  server s 127.0.0.1:{target}\n"
    open(f"{work}/haproxy-l4.cfg", "w").write(cfg)
    p = start("haproxy-l4", ["haproxy", "-db", "-f", f"{work}/haproxy-l4.cfg"])
    wait_port(ports["http"], p)
    return [p], ports


def haproxy_mtls(ng, ip):
    ports = {"http": free_port(), "iperf": free_port()}
    inner = {"http": free_port(), "iperf": free_port()}
    head = "global\n  nbthread 1\n  maxconn 7500\n  ulimit-n 20000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n" \
           "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n"
    client, server = head, head
    for name, target in (("http", ng), ("iperf", ip)):
        client += (f"frontend f_{name}\n  bind 127.0.0.1:{ports[name]}\n  default_backend b_{name}\n"
                   f"backend b_{name}\n  server s 127.0.0.1:{inner[name]} ssl crt {work}/client/combined.pem ca-file {work}/ca/ca.crt verify required\n")
        server += (f"frontend f_{name}\n  bind 127.0.0.1:{inner[name]} ssl crt {work}/server/combined.pem ca-file {work}/ca/ca.crt verify required\n"
                   f"  default_backend b_{name}\nbackend b_{name}\n  server s 127.0.0.1:{target}\n")
    open(f"{work}/haproxy-c.cfg", "w").write(client)
    open(f"{work}/haproxy-s.cfg", "w").write(server)
    ps = start("haproxy-s", ["haproxy", "-db", "-f", f"{work}/haproxy-s.cfg"])
    pc = start("haproxy-c", ["haproxy", "-db", "-f", f"{work}/haproxy-c.cfg"])
    wait_port(inner["http"], ps); wait_port(ports["http"], pc)
    return [pc, ps], ports


def stunnel_mtls(ng, ip):
    ports = {"http": free_port(), "iperf": free_port()}
    inner = {"http": free_port(), "iperf": free_port()}
    common = f"foreground = yes\nCAfile = {work}/ca/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
    client = common + f"pid = {work}/stunnel-c.pid\ncert = {work}/client/cert.pem\nkey = {work}/client/key.pem\n"
    server = common + f"pid = {work}/stunnel-s.pid\ncert = {work}/server/cert.pem\nkey = {work}/server/key.pem\nrequireCert = yes\n"
    for name, target in (("http", ng), ("iperf", ip)):
        client += f"[{name}]\nclient = yes\naccept = 127.0.0.1:{ports[name]}\nconnect = 127.0.0.1:{inner[name]}\n"
        server += f"[{name}]\naccept = 127.0.0.1:{inner[name]}\nconnect = 127.0.0.1:{target}\n"
    open(f"{work}/stunnel-c.conf", "w").write(client)
    open(f"{work}/stunnel-s.conf", "w").write(server)
    ps = start("stunnel-s", ["stunnel", f"{work}/stunnel-s.conf"])
    pc = start("stunnel-c", ["stunnel", f"{work}/stunnel-c.conf"])
    wait_port(inner["http"], ps); wait_port(ports["http"], pc)
    return [pc, ps], ports


def weft_ready(name, cfg):
    open(f"{work}/{name}.yaml", "w").write(cfg)
    p = start(name, [WEFT, "proxy", "-c", f"{work}/{name}.yaml", "--admin-address-path", f"{work}/{name}.admin"])
    end = time.time() + 20
    while time.time() < end:
        if p.poll() is not None:
            raise SystemExit(f"weft {name} exited: " + open(f"{work}/{name}.err").read())
        try:
            admin = open(f"{work}/{name}.admin").read().strip()
            if urllib.request.urlopen(f"http://{admin}/ready", timeout=1).status == 200:
                return p, json.load(urllib.request.urlopen(f"http://{admin}/listeners"))
        except Exception:
            time.sleep(0.02)
    raise SystemExit(f"weft {name} not ready")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def weft_l4(ng, ip):
    p, l = weft_ready("weft-l4", f"""workers: 1
admin: {{listen: 127.0.0.1:0}}
access_log: off
l4:
  - {{name: http, listen: 127.0.0.1:0, upstream: 127.0.0.1:{ng}}}
  - {{name: iperf, listen: 127.0.0.1:0, upstream: 127.0.0.1:{ip}}}
""")
    return [p], {"http": port_of(l["l4/http"]), "iperf": port_of(l["l4/iperf"])}


def weft_mtls(ng, ip):
    pb, lb = weft_ready("weft-b", f"""identity: {{cert: {work}/server/cert.pem, key: {work}/server/key.pem, ca: {work}/ca/ca.crt}}
workers: 1
admin: {{listen: 127.0.0.1:0}}
access_log: off
inbound:
  listen: 127.0.0.1:0
  targets:
    - {{address: 127.0.0.1:{ng}, allow: [spiffe://bench.local/ns/b/sa/client]}}
    - {{address: 127.0.0.1:{ip}, allow: [spiffe://bench.local/ns/b/sa/client]}}
""")
    b = lb["inbound"]
    pa, la = weft_ready("weft-a", f"""identity: {{cert: {work}/client/cert.pem, key: {work}/client/key.pem, ca: {work}/ca/ca.crt}}
workers: 1
admin: {{listen: 127.0.0.1:0}}
access_log: off
pool: {{max_streams: 1000}}
services:
  - {{name: http, addresses: ["{b}"], authority: "127.0.0.1:{ng}", spiffe_ids: [spiffe://bench.local/ns/b/sa/server]}}
  - {{name: iperf, addresses: ["{b}"], authority: "127.0.0.1:{ip}", spiffe_ids: [spiffe://bench.local/ns/b/sa/server]}}
outbound:
  - {{name: http, listen: 127.0.0.1:0, service: http}}
  - {{name: iperf, listen: 127.0.0.1:0, service: iperf}}
""")
    return [pa, pb], {"http": port_of(la["outbound/http"]), "iperf": port_of(la["outbound/iperf"])}


def haproxy_http_mtls(ng, ip):
    """HAProxy in HTTP mode on both sides (parses every request), mTLS between them."""
    port, inner, h2port = free_port(), free_port(), free_port()
    head = ("global\n  nbthread 1\n  maxconn 7500\n  ulimit-n 20000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
            "  ssl-default-server-options ssl-min-ver TLSv1.3\n"
            "defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  timeout connect 5s\n"
            "  timeout client 600s\n  timeout server 600s\n  timeout http-keep-alive 600s\n")
    e2e, inner2 = free_port(), free_port()
    tls_c = f"ssl crt {work}/client/combined.pem ca-file {work}/ca/ca.crt verify required"
    tls_s = f"ssl crt {work}/server/combined.pem ca-file {work}/ca/ca.crt verify required"
    client = head + (f"frontend f\n  bind 127.0.0.1:{port}\n  bind 127.0.0.1:{h2port} proto h2\n  default_backend b\n"
                     f"backend b\n  server s 127.0.0.1:{inner} {tls_c}\n"
                     # HTTP/2 end to end (as for gRPC): h2 between the proxies and to nginx.
                     f"frontend f2\n  bind 127.0.0.1:{e2e} proto h2\n  default_backend b2\n"
                     f"backend b2\n  server s 127.0.0.1:{inner2} {tls_c} alpn h2\n")
    server = head + (f"frontend f\n  bind 127.0.0.1:{inner} {tls_s}\n"
                     f"  default_backend b\nbackend b\n  server s 127.0.0.1:{ng}\n"
                     f"frontend f2\n  bind 127.0.0.1:{inner2} {tls_s} alpn h2\n  default_backend b2\n"
                     f"backend b2\n  server s 127.0.0.1:{NGINX_H2} proto h2\n")
    open(f"{work}/haproxy-hc.cfg", "w").write(client)
    open(f"{work}/haproxy-hs.cfg", "w").write(server)
    ps = start("haproxy-hs", ["haproxy", "-db", "-f", f"{work}/haproxy-hs.cfg"])
    pc = start("haproxy-hc", ["haproxy", "-db", "-f", f"{work}/haproxy-hc.cfg"])
    wait_port(inner, ps); wait_port(port, pc)
    return [pc, ps], {"http": port, "h2": h2port, "h2e2e": e2e}


def weft_l7_mtls(ng, ip):
    """Weft with an HTTP listener: requests parsed, routed and balanced; HBONE (mTLS) between."""
    pb, lb = weft_ready("weft-l7b", f"""identity: {{cert: {work}/server/cert.pem, key: {work}/server/key.pem, ca: {work}/ca/ca.crt}}
workers: 1
admin: {{listen: 127.0.0.1:0}}
access_log: off
inbound:
  listen: 127.0.0.1:0
  targets:
    - {{address: 127.0.0.1:{ng}, allow: [spiffe://bench.local/ns/b/sa/client]}}
    - {{address: 127.0.0.1:{NGINX_H2}, protocol: http2}}
""")
    b = lb["inbound"]
    pa, la = weft_ready("weft-l7a", f"""identity: {{cert: {work}/client/cert.pem, key: {work}/client/key.pem, ca: {work}/ca/ca.crt}}
workers: 1
admin: {{listen: 127.0.0.1:0}}
access_log: off
pool: {{max_streams: 1000}}
services:
  - name: http
    spiffe_ids: [spiffe://bench.local/ns/b/sa/server]
    endpoints: [{{address: "{b}", authority: "127.0.0.1:{ng}"}}]
    http: {{idle_timeout: 60s}}
  - name: http2
    spiffe_ids: [spiffe://bench.local/ns/b/sa/server]
    endpoints: [{{address: "{b}", authority: "127.0.0.1:{NGINX_H2}"}}]
    http: {{idle_timeout: 60s, protocol: http2}}
outbound:
  - {{name: http, listen: 127.0.0.1:0, service: http, protocol: http}}
  - {{name: http2, listen: 127.0.0.1:0, service: http2, protocol: http}}
""")
    # The same listener takes prior-knowledge HTTP/2 (told apart by the preface).
    return [pa, pb], {"http": port_of(la["outbound/http"]), "h2": port_of(la["outbound/http"]),
                      "h2e2e": port_of(la["outbound/http2"])}


def l7_rows(ng):
    rows = {}
    for name, make in (("HAProxy HTTP-mode mTLS chain", lambda: haproxy_http_mtls(ng, None)),
                       ("Weft L7 (HTTP) mTLS chain", lambda: weft_l7_mtls(ng, None))):
        log(f"{name}: starting")
        ps, ports = make()
        pids = [p.pid for p in ps]
        log(f"{name}: wrk 1 connection {DURATION}s")
        c1 = wrk(ports["http"], 1, pids)
        log(f"{name}: h2load 16 connections x 10 streams {DURATION}s")
        h2 = h2load(ports["h2"], pids)
        log(f"{name}: h2load end to end HTTP/2 {DURATION}s")
        e2e = h2load(ports["h2e2e"], pids)
        rows[name] = {"e2e_rps": e2e["rps"], "e2e_mean": e2e["mean_ms"], "e2e_cpu_per_1k": e2e["cpu_per_1k"], "p50": c1["p50"], "p99": c1["p99"],
                      "rps_1": c1["rps"], "h2_rps": h2["rps"],
                      "h2_mean": h2["mean_ms"], "h2_cpu_per_1k": h2["cpu_per_1k"]}
        for p in ps:
            p.terminate()
        for p in ps:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return rows


FIXED_RATES = [int(r) for r in os.environ.get("BENCH_FIXED_RATES", "2000,8000").split(",")]
FIXED_ROUNDS = int(os.environ.get("BENCH_FIXED_ROUNDS", "5"))


def fixed_rate(port, rate, pids):
    """Open-loop latency at a fixed request rate over 16 keep-alive connections (bench/fixed_rate.cc)."""
    tool = os.path.join(os.path.dirname(WEFT), "weft_fixed_rate")
    before = sum(cpu_s(p) for p in pids)
    r = subprocess.run([tool, "127.0.0.1", str(port), str(rate), "16", str(DURATION)],
                       capture_output=True, text=True, timeout=DURATION + 30)
    after = sum(cpu_s(p) for p in pids)
    try:
        res = json.loads(r.stdout)
    except ValueError:
        log(f"fixed_rate via {port} failed: {r.stdout[-300:]} {r.stderr[-300:]}")
        return None
    if res["errors"]:
        log(f"fixed_rate via {port} at {rate}/s: {res['errors']} errors")
    res["cpu"] = (after - before) / (DURATION + 1)  # vCPU, the tool's 1 s warm-up included
    return res


def alternating_rows(ng, rows):
    """Both chains up at once; each round measures wrk at 64 connections and every fixed rate on
    each, alternating, so the VM's slow spells fall on both. Medians of the rounds go into `rows`
    (64 connections) and the returned fixed-rate results."""
    chains = {"HAProxy HTTP-mode mTLS chain": haproxy_http_mtls(ng, None),
              "Weft L7 (HTTP) mTLS chain": weft_l7_mtls(ng, None)}
    runs = {name: {rate: [] for rate in FIXED_RATES} for name in chains}
    c64 = {name: [] for name in chains}
    for rnd in range(FIXED_ROUNDS):
        for name, (ps, ports) in chains.items():
            log(f"{name}: wrk 64 connections, round {rnd + 1}/{FIXED_ROUNDS}, {DURATION}s")
            res = wrk(ports["http"], 64, [p.pid for p in ps])
            if res["rps"]:
                c64[name].append(res)
        for rate in FIXED_RATES:
            for name, (ps, ports) in chains.items():
                log(f"{name}: {rate} req/s fixed rate, round {rnd + 1}/{FIXED_ROUNDS}, {DURATION}s")
                res = fixed_rate(ports["http"], rate, [p.pid for p in ps])
                if res:
                    runs[name][rate].append(res)
    for ps, _ in chains.values():
        for p in ps:
            p.terminate()
        for p in ps:
            p.wait(timeout=20)
    for name, results in c64.items():
        row = rows.setdefault(name, {})
        row["rps"], row["p99_64"] = median_of(results, "rps"), median_of(results, "p99")
        row["cpu_per_1k"] = median_of(results, "cpu_per_1k")
        row["rps_each"] = [r["rps"] for r in results]
    return runs


def median_of(results, key):
    vals = sorted(r[key] for r in results if r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


def fixed_rate_report(runs):
    lines = ["", f"### L7 HTTP/1.1 latency at a fixed rate (open loop, 16 connections, median of {FIXED_ROUNDS} alternating rounds)", "",
             "Latency runs from when each request was due, so time queued behind a slow response counts.", "",
             "| path | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | p99 ms each round | vCPU (both proxies) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_rate in runs.items():
        for rate, results in by_rate.items():
            each = ", ".join(f"{r['p99_ms']:.2f}" for r in results)
            lines.append(f"| {name} | {rate:,} | {fmt(median_of(results, 'p50_ms'), '{:.3f}')} | "
                         f"{fmt(median_of(results, 'p90_ms'), '{:.3f}')} | {fmt(median_of(results, 'p99_ms'), '{:.3f}')} | "
                         f"{fmt(median_of(results, 'p999_ms'), '{:.3f}')} | {each} | {fmt(median_of(results, 'cpu'))} |")
    w, h = runs.get("Weft L7 (HTTP) mTLS chain"), runs.get("HAProxy HTTP-mode mTLS chain")
    if w and h:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for rate in FIXED_RATES:
            wp, hp = median_of(w[rate], "p99_ms"), median_of(h[rate], "p99_ms")
            if wp is None or hp is None:
                lines.append(f"| p99 below HAProxy's at {rate:,} req/s | failed (see log) | NO |")
            else:
                lines.append(f"| p99 below HAProxy's at {rate:,} req/s | {wp:.3f} vs {hp:.3f} ms | {'yes' if wp < hp else 'NO'} |")
    return "\n".join(lines) + "\n"


def l7_report(rows):
    lines = ["", "### L7 HTTP: two proxies parsing HTTP/1.1, mTLS between (wrk, nginx origin, 1 worker each)", "",
             "wrk is closed loop: a stall delays the requests behind it instead of counting against them, and at",
             "1 connection its p99 swings with the VM's scheduling from run to run. The p99 target is judged at a",
             f"fixed rate (further down). The 64-connection columns are medians of {FIXED_ROUNDS} rounds alternating with HAProxy.", "",
             "| path | req/s (1 conn) | p50 ms (1 conn) | p99 ms (1 conn) | req/s (64 conns) | p99 ms (64 conns) | vCPU per 1k req/s (both proxies) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {fmt(r['rps_1'], '{:,.0f}')} | {fmt(r['p50'], '{:.3f}')} | {fmt(r['p99'], '{:.3f}')} | "
                     f"{fmt(r['rps'], '{:,.0f}')} | {fmt(r['p99_64'], '{:.3f}')} | {fmt(r['cpu_per_1k'], '{:.3f}')} |")
    w, h = rows.get("Weft L7 (HTTP) mTLS chain"), rows.get("HAProxy HTTP-mode mTLS chain")
    if w and h and w["rps"] and h["rps"]:
        # Each round's ratio compares runs seconds apart; the target takes the median ratio.
        ratios = sorted(a / b for a, b in zip(w["rps_each"], h["rps_each"]))
        ratio = ratios[len(ratios) // 2] if ratios else w["rps"] / h["rps"]
        each = ", ".join(f"{a / b:.2f}×" for a, b in zip(w["rps_each"], h["rps_each"]))
        lines += ["", f"Weft / HAProxy req/s at 64 connections, round by round: {each}", "",
                  "| target | measured | met |", "|---|---|---|",
                  f"| ≥ 1.3× HAProxy req/s at 64 conns (median of the rounds' ratios) | {ratio:.2f}× | {'yes' if ratio >= 1.3 else 'NO'} |",
                  f"| ≤ 0.05 vCPU per 1,000 req/s (both proxies) | {w['cpu_per_1k']:.3f} | {'yes' if w['cpu_per_1k'] <= 0.05 else 'NO'} |"]
    lines += ["", "### L7 HTTP/2: prior-knowledge h2c from h2load (16 connections × 10 streams) into the client proxy", "",
              "| path | req/s | mean ms per request | vCPU per 1k req/s (both proxies) |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {fmt(r.get('h2_rps'), '{:,.0f}')} | {fmt(r.get('h2_mean'), '{:.3f}')} | "
                     f"{fmt(r.get('h2_cpu_per_1k'), '{:.3f}')} |")
    if w and h and w.get("h2_rps") and h.get("h2_rps"):
        lines.append(f"\nWeft / HAProxy req/s over HTTP/2: {w['h2_rps'] / h['h2_rps']:.2f}×")
    lines += ["", "### L7 HTTP/2 end to end (as gRPC goes): h2load → proxy → HTTP/2 over mTLS → proxy → nginx h2c", "",
              "| path | req/s | mean ms per request | vCPU per 1k req/s (both proxies) |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {fmt(r.get('e2e_rps'), '{:,.0f}')} | {fmt(r.get('e2e_mean'), '{:.3f}')} | "
                     f"{fmt(r.get('e2e_cpu_per_1k'), '{:.3f}')} |")
    if w and h and w.get("e2e_rps") and h.get("e2e_rps"):
        lines.append(f"\nWeft / HAProxy req/s, HTTP/2 end to end: {w['e2e_rps'] / h['e2e_rps']:.2f}×")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- measures
def iperf(port):
    r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(DURATION), "-J"],
                       capture_output=True, text=True, timeout=DURATION + 30)
    try:
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except Exception:
        log(f"iperf3 via {port} failed: {r.stdout[-300:]} {r.stderr[-300:]}")
        return None


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n = float(m.group(1))
    return n / 1000 if m.group(2) == "us" else n * 1000 if m.group(2) == "s" else n


def wrk(port, conns, pids):
    threads = 1 if conns == 1 else 2
    before = sum(cpu_s(p) for p in pids)
    p = subprocess.Popen(["wrk", f"-t{threads}", f"-c{conns}", f"-d{DURATION}s", "--latency", f"http://127.0.0.1:{port}/"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, sum(rss_kb(x) for x in pids)) if pids else 0
        time.sleep(0.25)  # sampling interval for RSS under load
    out = p.stdout.read()
    after = sum(cpu_s(x) for x in pids)
    res = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    total = re.search(r"(\d+) requests in", out)
    requests = int(total.group(1)) if total else 0
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}"] = to_ms(m.group(1)) if m else None
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errs:
        log(f"wrk via {port}: {errs.group(0)}")
    res["cpu_per_1k"] = (after - before) / (requests / 1000) if requests and pids else None
    res["rss_load_kb"] = peak
    return res


def h2load(port, pids, conns=16, streams=10):
    before = sum(cpu_s(p) for p in pids)
    r = subprocess.run(["h2load", "-D", str(DURATION), "-c", str(conns), "-m", str(streams), "-t", "1",
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=DURATION + 60)
    after = sum(cpu_s(p) for p in pids)
    out = r.stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not rps or not done or int(done.group(2)):
        log(f"h2load via {port}: {out[-400:]} {r.stderr[-200:]}")
    ok = int(done.group(1)) if done else 0
    return {"rps": float(rps.group(1)) if rps and ok else None,
            "mean_ms": to_ms(mean.group(1)) if mean else None,
            "cpu_per_1k": (after - before) / (ok / 1000) if ok and pids else None}


def nginx_active():
    body = urllib.request.urlopen(f"http://127.0.0.1:{NGINX}/status", timeout=2).read().decode()
    return int(re.search(r"Active connections:\s+(\d+)", body).group(1))


def idle_memory(port, pids, count):
    """RSS growth of the proxies per idle connection held open end to end."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base_active = nginx_active()
    before = sum(rss_kb(p) for p in pids)
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        end = time.time() + 60
        while nginx_active() < base_active + count and time.time() < end:
            time.sleep(0.05)  # polling until every connection reached nginx
        reached = nginx_active() - base_active
        after = sum(rss_kb(p) for p in pids)
        return (after - before) * 1024 / count, reached
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- main
def main():
    global NGINX
    for tool in ("nginx", "iperf3", "wrk", "haproxy", "stunnel"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} missing: run scripts/install-deps")
    setup_pki()
    NGINX, IPERF = start_backends()
    paths = [("direct", lambda: ([], {"http": NGINX, "iperf": IPERF})),
             ("HAProxy L4", lambda: haproxy_l4(NGINX, IPERF)),
             ("Weft L4", lambda: weft_l4(NGINX, IPERF)),
             ("HAProxy mTLS chain", lambda: haproxy_mtls(NGINX, IPERF)),
             ("stunnel mTLS chain", lambda: stunnel_mtls(NGINX, IPERF)),
             ("Weft mTLS chain", lambda: weft_mtls(NGINX, IPERF))]
    rows = {}
    for name, make in paths:
        log(f"{name}: starting")
        ps, ports = make()
        pids = [p.pid for p in ps]
        row = {"idle_rss_kb": max((rss_kb(p) for p in pids), default=None)}
        log(f"{name}: iperf3 {DURATION}s")
        row["gbps"] = iperf(ports["iperf"])
        log(f"{name}: wrk 1 connection {DURATION}s")
        c1 = wrk(ports["http"], 1, pids)
        row["p50"], row["p99"] = c1["p50"], c1["p99"]
        log(f"{name}: wrk 64 connections {DURATION}s")
        c64 = wrk(ports["http"], 64, pids)
        row["rps"], row["cpu_per_1k"] = c64["rps"], c64["cpu_per_1k"]
        row["rss_load_kb"] = c64["rss_load_kb"] if pids else None
        if pids and name != "stunnel mTLS chain":  # stunnel: a thread per connection, 10k is not idle-able
            # HAProxy reserves 2.5 descriptors per connection (sockets and splice pipes) under a 20,000 descriptor limit here.
            # Weft L4 holds two sockets per connection in one process: 9,000 fit under the limit.
            count = {"Weft mTLS chain": IDLE_CONNS, "Weft L4": min(IDLE_CONNS, 9000)}.get(name, min(IDLE_CONNS, 7000))
            log(f"{name}: {count} idle connections")
            per, reached = idle_memory(ports["http"], pids, count)
            row["idle_conn_bytes"], row["idle_reached"] = per, reached
        rows[name] = row
        for p in ps:
            p.terminate()
        for p in ps:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return rows


def control_bench():
    """Registrations per second and control RSS with BENCH_AGENTS agents (real keys and CSRs)."""
    agents = int(os.environ.get("BENCH_AGENTS", "10000"))
    load = os.path.join(os.path.dirname(WEFT), "weft_control_load")
    addr_file = f"{work}/control.addr"
    p = start("control", [WEFT, "control", "--ca", f"{work}/ca", "--data-dir", f"{work}/control",
                          "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--address-file", addr_file])
    end = time.time() + 20
    while not os.path.exists(addr_file) and time.time() < end:
        time.sleep(0.02)  # polling interval
    addr = open(addr_file).read().strip()
    key = subprocess.run([WEFT, "control", "keys", "create", "--data-dir", f"{work}/control", "--reusable", "--ttl", "1h"],
                         capture_output=True, text=True, check=True).stdout.strip()
    log(f"control: {agents} agents registering from 8 threads")
    r = subprocess.run([load, f"https://{addr}", f"{work}/ca/ca.crt", key, str(agents), "8"],
                       capture_output=True, text=True, timeout=600)
    res = json.loads(r.stdout)
    res["rss_mb"] = rss_kb(p.pid) / 1024
    res["agents"] = agents
    endpoints = int(os.environ.get("BENCH_ENDPOINTS", "100000"))
    log(f"control: {endpoints} endpoints, then 1,000 watchers and 5 changes that concern all of them")
    fan = subprocess.run([os.path.join(os.path.dirname(WEFT), "weft_watch_fanout"), addr.rsplit(":", 1)[0],
                          addr.rsplit(":", 1)[1], f"{work}/ca/ca.crt",
                          open(f"{work}/control/admin.token").read().strip(), "1000", str(endpoints), "5"],
                         capture_output=True, text=True, timeout=1200)
    res["fanout"] = json.loads(fan.stdout) if fan.returncode == 0 else None
    res["rss_after_fanout_mb"] = rss_kb(p.pid) / 1024
    p.terminate()
    p.wait(timeout=20)
    return res


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def report(rows):
    lines = [f"## Weft benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, loopback, {DURATION}s per measure",
             "",
             "| path | iperf3 Gbit/s | p50 ms (1 conn) | p99 ms (1 conn) | req/s (64 conns) | CPU s / 1k req | idle RSS MB (max proxy) | RSS under load MB (all proxies) | bytes / idle conn (all proxies) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "control":
            continue
        idle = r.get("idle_conn_bytes")
        idle_s = "n/a" if idle is None else f"{idle:,.0f} ({r['idle_reached']} open)"
        lines.append(f"| {name} | {fmt(r['gbps'])} | {fmt(r['p50'], '{:.3f}')} | {fmt(r['p99'], '{:.3f}')} | {fmt(r['rps'], '{:,.0f}')} | "
                     f"{fmt(r['cpu_per_1k'], '{:.3f}')} | {fmt(r['idle_rss_kb'] and r['idle_rss_kb'] / 1024)} | "
                     f"{fmt(r['rss_load_kb'] and r['rss_load_kb'] / 1024)} | {idle_s} |")
    w, h, wl, hl = rows.get("Weft mTLS chain"), rows.get("HAProxy mTLS chain"), rows.get("Weft L4"), rows.get("HAProxy L4")

    def ratio(a, b):
        return None if not a or not b else a / b
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    checks = [
        ("Weft mTLS ≥ 1.3× HAProxy mTLS, iperf3", ratio(w["gbps"], h["gbps"]), lambda x: x >= 1.3, "{:.2f}×"),
        ("Weft mTLS ≥ 1.3× HAProxy mTLS, req/s at 64", ratio(w["rps"], h["rps"]), lambda x: x >= 1.3, "{:.2f}×"),
        ("Weft p50 at 1 conn ≤ HAProxy chain", ratio(w["p50"], h["p50"]), lambda x: x <= 1.0, "{:.2f}× of HAProxy's"),
        ("Weft L4 ≥ HAProxy L4, iperf3", ratio(wl["gbps"], hl["gbps"]), lambda x: x >= 1.0, "{:.2f}×"),
        ("a Weft proxy's idle RSS ≤ 10 MB", max(wl["idle_rss_kb"], w["idle_rss_kb"]) / 1024, lambda x: x <= 10, "{:.1f} MB"),
        ("≤ 8 KiB per idle tunnelled connection (both proxies)", w.get("idle_conn_bytes") and w["idle_conn_bytes"] / 1024, lambda x: x <= 8, "{:.2f} KiB"),
    ]
    for label, v, ok, f in checks:
        lines.append(f"| {label} | {fmt(v, f)} | {'n/a' if v is None else ('yes' if ok(v) else 'NO')} |")
    c = rows.get("control")
    if c:
        lines += ["", f"### Control plane ({c['agents']:,} simulated agents, real Ed25519 keys and CSRs, HTTPS, 8 client threads)", "",
                  "| measure | value | target | met |", "|---|---|---|---|",
                  f"| registrations/s | {c['per_second']:.0f} | ≥ 500 | {'yes' if c['per_second'] >= 500 else 'NO'} |",
                  f"| control RSS at {c['registered']:,} agents | {c['rss_mb']:.1f} MB | ≤ 200 MB | {'yes' if c['rss_mb'] <= 200 else 'NO'} |",
                  f"| control RSS with {c['fanout']['endpoints'] if c.get('fanout') else 0:,} endpoints and 1,000 watchers | {c['rss_after_fanout_mb']:.1f} MB | ≤ 200 MB | {'yes' if c['rss_after_fanout_mb'] <= 200 else 'NO'} |"]
        f = c.get("fanout")
        if f:
            lines += [f"| endpoint writes/s (one keep-alive client) | {f['endpoints_per_second']:.0f} | – | – |",
                      f"| watch fan-out p50 at 1,000 watchers | {f['fanout_p50_ms']:.1f} ms | – | – |",
                      f"| watch fan-out p99 at 1,000 watchers | {f['fanout_p99_ms']:.1f} ms | ≤ 1 s | {'yes' if f['fanout_p99_ms'] <= 1000 else 'NO'} |"]
        else:
            lines += ["| watch fan-out p99 at 1,000 watchers | failed (see log) | ≤ 1 s | NO |"]
    return "\n".join(lines) + "\n"


try:
    if os.environ.get("BENCH_ONLY") == "l7":
        setup_pki()
        NGINX, _ = start_backends()
        l7 = l7_rows(NGINX)
        fixed = alternating_rows(NGINX, l7)
        print(l7_report(l7) + fixed_rate_report(fixed))
        raise SystemExit(0)
    rows = main()
    l7 = l7_rows(NGINX)
    rows["control"] = control_bench()
    fixed = alternating_rows(NGINX, l7)
    text = report(rows) + l7_report(l7) + fixed_rate_report(fixed)
    # Cross-site P2P in network namespaces (root): direct vs Nebula vs Weft direct and relayed.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import p2p_netsim_bench
    p2p_netsim_bench.WEFT = p2p_netsim_bench.net.WEFT = WEFT
    p2p_netsim_bench.SECS = DURATION
    log("P2P across sites (netsim): starting")
    text += p2p_netsim_bench.report(p2p_netsim_bench.run())
    print(text)
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/{datetime.datetime.utcnow():%Y%m%d-%H%M%S}.md"
    open(path, "w").write(text)
    log(f"written to {path}")
finally:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)
