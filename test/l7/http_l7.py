#!/usr/bin/python3
"""L7 HTTP through two Weft proxies on loopback: routes, splits, header rewrite, balancing,
retries, circuit breakers, outlier detection, timeouts, rate limits, fault injection, request
metrics, access log and traceparent.

client --HTTP/1.1--> weft (outbound, protocol: http) --HBONE/mTLS--> weft (inbound) --> origins
usage: http_l7.py path/to/weft
"""
import base64
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import os
import re
import sys
import time

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
HERE = os.path.dirname(os.path.abspath(__file__))
TD = "l7.test"
sys.path.insert(0, HERE)
from harness import Harness, wait_for  # noqa: E402


def main():
    h = Harness(WEFT, "weft-l7-", TD)
    work, check, start_proxy, identity = h.work, h.check, h.proxy, h.identity
    try:
        h.pki("client", "server")
        port = h.origins(HERE, "a", "b", "c", "flaky:flaky", "bad:bad", "short:short",
                           "sluggish:sluggish")

        targets = "".join(f"    - {{authority: '{n}:80', address: '127.0.0.1:{p}'}}\n"
                          for n, p in port.items())
        _, server = start_proxy("server", identity("server") + "admin: {listen: 127.0.0.1:0}\n"
                                "inbound:\n  listen: 127.0.0.1:0\n  targets:\n" + targets)
        hbone = server["inbound"]
        sid = f"spiffe://{TD}/ns/default/sa/server"

        # A second server proxy parses requests too (protocol: http): HMAC, authorization,
        # a per-caller rate limit.
        key_file = os.path.join(work, "pair.key")
        with open(key_file, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        os.chmod(key_file, 0o600)
        pair_key = open(key_file).read().strip().encode()
        cid = f"spiffe://{TD}/ns/default/sa/client"
        guard_admin, guard = start_proxy("guard", identity("server") + "admin: {listen: 127.0.0.1:0}\n"
                                         "inbound:\n  listen: 127.0.0.1:0\n  targets:\n"
                                         f"    - authority: 'guarded:80'\n      address: '127.0.0.1:{port['a']}'\n"
                                         "      protocol: http\n"
                                         f"      hmac: {{keys: [{{source: '{cid}', key_file: '{key_file}'}}]}}\n"
                                         "      authorization:\n"
                                         "        - {action: deny, paths: [/api/admin]}\n"
                                         f"        - {{action: allow, sources: ['{cid}'], methods: [GET, POST], paths: [/api/]}}\n"
                                         f"    - authority: 'counted:80'\n      address: '127.0.0.1:{port['a']}'\n"
                                         "      protocol: http\n      rate_limit: {per_second: 1, burst: 2}\n")
        guard_hbone = guard["inbound"]

        def service(name, origins, http_block=""):
            eps = "".join(f"      - {{address: '{hbone}', authority: '{o}:80'}}\n" for o in origins)
            return (f"  - name: {name}\n    spiffe_ids: ['{sid}']\n    endpoints:\n{eps}"
                    + http_block)

        services = "services:\n" + "".join([
            service("echo", ["a", "b", "c"]),
            service("echo-a", ["a"]), service("echo-b", ["b"]),
            service("flaky", ["flaky"]), service("sluggish", ["sluggish"]),
            service("sticky", ["a", "b", "c"],
                    "    http: {load_balancer: ring_hash, hash_on: 'header:x-user'}\n"),
            service("outlier", ["a", "bad"],
                    "    http:\n      outlier_detection: {consecutive_errors: 2, base_ejection: 1s,"
                    " max_ejection_percent: 50}\n"),
            service("narrow", ["a"], "    http:\n      circuit_breakers: {max_requests: 2}\n"),
            service("short", ["short"]),
            service("p2c", ["a", "b"], "    http: {load_balancer: least_request}\n"),
            f"  - name: guarded\n    spiffe_ids: ['{sid}']\n    endpoints: [{{address: '{guard_hbone}', authority: 'guarded:80'}}]\n"
            f"    http: {{hmac: {{key_file: '{key_file}'}}}}\n",
            f"  - name: guarded-raw\n    spiffe_ids: ['{sid}']\n    endpoints: [{{address: '{guard_hbone}', authority: 'guarded:80'}}]\n",
            f"  - name: counted\n    spiffe_ids: ['{sid}']\n    endpoints: [{{address: '{guard_hbone}', authority: 'counted:80'}}]\n",
            service("checked", ["a", "bad"],
                    "    http:\n      outlier_detection: {consecutive_errors: 0}\n"
                    "      health_check: {type: http, path: /healthz, interval: 100ms, timeout: 1s,"
                    " unhealthy_threshold: 2}\n"),
        ])
        routes = """\
      - name: canary
        match: {headers: [{name: x-canary, value: '1'}]}
        backends: [{service: echo-a, weight: 80}, {service: echo-b, weight: 20}]
      - name: flaky-retried
        match: {path: {prefix: /flaky/retried}}
        service: flaky
        retries: {attempts: 3, on: [5xx, reset, connect-failure], backoff: 5ms}
      - name: per-try
        match: {path: {prefix: /pertry/one}}
        service: sluggish
        timeout: 1s
        retries: {attempts: 2, on: [5xx], per_try_timeout: 200ms}
      - name: per-try-all
        match: {path: {prefix: /pertry/all}}
        service: echo-a
        timeout: 5s
        retries: {attempts: 2, on: [5xx], per_try_timeout: 150ms, backoff: 5ms}
      - name: flaky-bare
        match: {path: {prefix: /flaky}}
        service: flaky
      - name: sticky
        match: {path: {prefix: /sticky}}
        service: sticky
      - name: outlier
        match: {path: {exact: /outlier}}
        service: outlier
      - name: narrow
        match: {path: {prefix: /narrow}}
        service: narrow
      - name: timeout
        match: {path: {prefix: /slow}}
        service: echo-a
        timeout: 300ms
      - name: limited
        match: {path: {prefix: /limited}}
        service: echo-a
        rate_limit: {per_second: 1, burst: 3}
      - name: fault
        match: {path: {regex: '/fault/[0-9]+'}, method: GET}
        service: echo-a
        fault: {abort: {percent: 100, status: 418}}
      - name: short
        match: {path: {prefix: /short}}
        service: short
      - name: p2c
        match: {path: {prefix: /p2c}}
        service: p2c
      - name: guarded
        match: {headers: [{name: x-to, value: guarded}]}
        service: guarded
      - name: unsigned
        match: {headers: [{name: x-to, value: unsigned}]}
        service: guarded-raw
      - name: counted
        match: {headers: [{name: x-to, value: counted}]}
        service: counted
      - name: checked
        match: {path: {prefix: /checked}}
        service: checked
      - name: mesh
        match: {host: '*.mesh'}
        service: echo
        request_headers: {add: {x-weft-test: 'yes'}, remove: [x-secret]}
        response_headers: {add: {x-served-by: weft}}
"""
        admin, client = start_proxy(
            "client", identity("client") + "admin: {listen: 127.0.0.1:0}\n" + services +
            "outbound:\n  - {name: raw, listen: 127.0.0.1:0, service: guarded-raw}\n"
            "  - name: web\n    listen: 127.0.0.1:0\n    protocol: http\n"
            "    max_request_body: 1048576\n    routes:\n" + routes)
        front = client["outbound/web"]
        host, p = front.rsplit(":", 1)

        conn = [http.client.HTTPConnection(host, int(p), timeout=10)]

        def get(path, headers=None, method="GET", body=None, fresh=False):
            h = {"host": "web.mesh"}
            h.update(headers or {})
            for attempt in range(2):
                try:
                    c = http.client.HTTPConnection(host, int(p), timeout=10) if fresh else conn[0]
                    c.request(method, path, body=body, headers=h)
                    r = c.getresponse()
                    data = r.read()
                    if fresh or r.getheader("connection", "").lower() == "close":
                        c.close()
                        if not fresh:
                            conn[0] = http.client.HTTPConnection(host, int(p), timeout=10)
                    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data
                except (http.client.HTTPException, ConnectionError):
                    conn[0] = http.client.HTTPConnection(host, int(p), timeout=10)
                    if attempt == 1:
                        raise

        # Routing, header rewrite, trace context.
        status, headers, body = get("/hello", {"x-secret": "s3cret"})
        seen = json.loads(body) if status == 200 else {}
        check(status == 200 and seen.get("origin") in ("a", "b", "c"),
              f"GET through two proxies: {status} from origin {seen.get('origin')}")
        fwd = seen.get("headers", {})
        check(fwd.get("x-weft-test") == "yes" and "x-secret" not in fwd,
              "request headers added and removed by the route")
        check(headers.get("x-served-by") == "weft", "response header added by the route")
        check(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", fwd.get("traceparent", "")) is not None,
              f"a traceparent is started when none came: {fwd.get('traceparent')}")
        incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        _, _, body = get("/hello", {"traceparent": incoming})
        tp = json.loads(body)["headers"].get("traceparent", "")
        check(tp.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and
              not tp.endswith("00f067aa0ba902b7-01"),
              f"an incoming trace ID is kept, with our span ID: {tp}")

        # Round robin over three endpoints.
        origins = [json.loads(get("/rr")[2])["origin"] for _ in range(30)]
        counts = {o: origins.count(o) for o in "abc"}
        check(all(8 <= n <= 12 for n in counts.values()), f"round robin spreads evenly: {counts}")

        # Weighted split by header match.
        picks = [json.loads(get("/split", {"x-canary": "1"})[2])["origin"] for _ in range(200)]
        share_a = picks.count("a") / len(picks)
        check(0.70 <= share_a <= 0.90 and picks.count("b") > 0,
              f"80/20 weighted split: {share_a:.0%} to a, {picks.count('b')} to b")

        # Retries recover from an upstream that fails half of its requests.
        bare = [get("/flaky/bare")[0] for _ in range(20)]
        check(bare.count(503) >= 8, f"without retries the flaky origin fails: {bare.count(503)}/20 503s")
        retried = [get("/flaky/retried")[0] for _ in range(40)]
        check(retried.count(200) == 40, f"with retries every request succeeds: {retried.count(200)}/40")

        # Ring hash: the same user sticks to one endpoint; users spread.
        sticky = {}
        for user in [f"user-{i}" for i in range(12)]:
            sticky[user] = {json.loads(get("/sticky", {"x-user": user})[2])["origin"] for _ in range(10)}
        check(all(len(v) == 1 for v in sticky.values()),
              f"ring hash: each user always lands on one endpoint: {sticky}")
        check(len(set().union(*sticky.values())) >= 2, "ring hash: users spread over endpoints")

        # Outlier detection: two 500s in a row eject `bad` for 1 s; then it comes back.
        results = [get("/outlier")[0] for _ in range(20)]
        check(results.count(500) <= 3 and results[-10:].count(200) == 10,
              f"outlier ejected after consecutive 5xx: {results.count(500)} 500s of 20")
        t0 = time.time()
        wait_for("the ejected endpoint to return", lambda: get("/outlier")[0] == 500, timeout=10)
        check(True, f"the ejected endpoint returned after {time.time() - t0:.1f}s (base ejection 1 s)")

        # Route timeout.
        status, _, body = get("/slow?sleep=1000")
        check(status == 504 and b"timeout" in body, f"route timeout 300ms: {status} {body[:60]!r}")
        status, _, _ = get("/slow?sleep=10")
        check(status == 200, "a fast request on the same route succeeds")

        # Per-try timeout: a try the origin sits on is abandoned and retried within the route's
        # 1 s (the sluggish origin answers every other request 3 s late).
        pertry = [get("/pertry/one")[0] for _ in range(4)]
        check(pertry == [200] * 4, f"per_try_timeout 200ms retries past a stalled try: {pertry}")
        status, _, body = get("/pertry/all?sleep=1000")
        check(status == 504 and b"per-try timeout" in body and b"3 attempts" in body,
              f"every try stalled: 504 after 3 attempts, not the route's 5 s: {status} {body[:90]!r}")

        # Circuit breaker: max_requests 2, six concurrent slow requests.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(get, "/narrow?sleep=400", None, "GET", None, True) for _ in range(6)]
            got = [f.result() for f in futs]
        tripped = [g for g in got if g[0] == 503]
        check(len(tripped) >= 3 and all(g[1].get("x-weft-overloaded") == "max_requests" and
                                        b"max_requests" in g[2] for g in tripped),
              f"circuit breaker trips with 503 naming max_requests: {[g[0] for g in got]}")
        check(get("/narrow")[0] == 200, "the breaker closes again when requests finish")

        # Rate limit: burst 3 at 1/s.
        codes = [get("/limited")[0] for _ in range(6)]
        check(codes[:3] == [200] * 3 and 429 in codes[3:], f"local rate limit answers 429: {codes}")

        # Fault injection and 404.
        status, _, body = get("/fault/7")
        check(status == 418 and b"fault" in body, f"fault abort 100% -> 418: {status}")
        status, _, _ = get("/fault/7", method="POST")
        check(status == 200, "the fault route matches GET only (method match)")
        status, _, body = get("/nothing", {"host": "elsewhere.example"})
        check(status == 404 and b"no route" in body, f"no route -> 404: {status}")

        # Bodies: a request body is forwarded, an oversized one refused, a large response streams.
        status, _, body = get("/post", method="POST", body=b"x" * 300000)
        check(status == 200 and json.loads(body)["body_bytes"] == 300000, "300 kB request body")
        status, _, body = get("/post", method="POST", body=b"x" * 2000000, fresh=True)
        check(status == 413, f"a body over max_request_body -> 413: {status}")
        status, headers, body = get("/big?size=5000000")
        expected = hashlib.sha256((bytes(range(256)) * 256 * 77)[:5000000]).hexdigest()
        check(status == 200 and hashlib.sha256(body).hexdigest() == expected,
              f"a 5 MB response streams through intact ({len(body)} bytes)")
        status, headers, body = get("/hello", method="HEAD")
        check(status == 200 and body == b"", "HEAD")

        # The origin closes idle keep-alive connections after 0.3 s: pooled connections it
        # closed are never reused into a 503.
        codes = []
        for _ in range(5):
            codes.append(get("/short")[0])
            time.sleep(0.5)  # longer than the origin's keep-alive, on purpose
        check(codes == [200] * 5, f"no 503 when the app's keep-alive is shorter than ours: {codes}")

        # Least request (P2C): with one endpoint held busy, new requests go to the other.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(get, "/p2c?sleep=600", None, "GET", None, True) for _ in range(2)]
            time.sleep(0.15)  # let the slow ones start
            quick = [json.loads(get("/p2c")[2])["origin"] for _ in range(10)]
            [f.result() for f in slow]
        check(len(quick) == 10, f"least request keeps serving while endpoints are busy: {quick}")

        # Active health checks: `bad` fails GET /healthz, so balancing leaves it out.
        wait_for("the failing endpoint to be marked unhealthy",
                 lambda: all(get("/checked")[0] == 200 for _ in range(6)), timeout=10)
        codes = [get("/checked")[0] for _ in range(20)]
        check(codes.count(200) == 20, f"active health checks keep an unhealthy endpoint out: {codes.count(200)}/20")

        # Inbound L7: HMAC signed by the client proxy, verified by the guard; authorization.
        status, _, body = get("/api/items", {"x-to": "guarded"})
        seen = json.loads(body) if status == 200 else {}
        check(status == 200 and "x-weft-signature" not in seen.get("headers", {"x": 1}),
              f"a signed request passes HMAC verification; the signature is not passed on: {status}")
        status, _, body = get("/api/items", {"x-to": "guarded"}, method="POST", body=b"payload")
        check(status == 200, f"a signed POST with a body: {status}")
        status, _, body = get("/api/admin/users", {"x-to": "guarded"})
        check(status == 403 and b"RBAC" in body, f"a deny rule on a path prefix -> 403: {status} {body[:50]!r}")
        status, _, body = get("/other", {"x-to": "guarded"})
        check(status == 403 and b"no allow rule" in body, f"no allow rule matches -> 403: {status}")
        status, _, body = get("/api/items", {"x-to": "unsigned"})
        check(status == 401 and b"missing" in body, f"an unsigned request -> 401: {status} {body[:60]!r}")
        # Hand-made requests over a plain tunnel (an L4 listener to the same target): the
        # signature scheme computed independently here, then replayed, tampered and stale.
        raw_port = int(client["outbound/raw"].rsplit(":", 1)[1])

        def raw(path, sig_path=None, ts=None, nonce=None, body=b""):
            ts = int(time.time()) if ts is None else ts
            nonce = nonce or os.urandom(16).hex()
            host_h = "guarded:80"
            canonical = (f"v1\nGET\n{sig_path or path}\n{ts}\n{nonce}\nhost:{host_h}\ncontent-type:\n"
                         + hashlib.sha256(body).hexdigest())
            sig = hmac.new(pair_key, canonical.encode(), hashlib.sha256).hexdigest()
            header = f"v1;ts={ts};nonce={nonce};headers=host,content-type;sig={sig}"
            c = http.client.HTTPConnection("127.0.0.1", raw_port, timeout=10)
            c.request("GET", path, headers={"host": host_h, "x-weft-signature": header})
            r = c.getresponse()
            data = r.read()
            c.close()
            return r.status, data, nonce
        status, body, nonce = raw("/api/raw")
        check(status == 200, f"a request signed by an independent implementation verifies: {status} {body[:80]!r}")
        status, body, _ = raw("/api/raw", nonce=nonce)
        check(status == 401 and b"replayed" in body, f"a replayed nonce -> 401: {status} {body[:60]!r}")
        status, body, _ = raw("/api/raw?amount=1000", sig_path="/api/raw")
        check(status == 401 and b"tampered" in body, f"a tampered request -> 401: {status} {body[:60]!r}")
        status, body, _ = raw("/api/raw", ts=int(time.time()) - 600)
        check(status == 401 and b"stale" in body, f"a stale request (10 min old) -> 401: {status} {body[:60]!r}")
        codes = [get("/x", {"x-to": "counted"})[0] for _ in range(5)]
        check(codes[:2] == [200, 200] and 429 in codes[2:], f"inbound per-caller rate limit: {codes}")
        c = http.client.HTTPConnection(guard_admin, timeout=5)
        c.request("GET", "/metrics")
        gm = c.getresponse().read().decode()
        check(re.search(r'istio_requests_total\{reporter="destination",source_principal="spiffe://l7.test/ns/default/sa/client",'
                        r'destination_principal="spiffe://l7.test/ns/default/sa/server",destination_service="guarded:80",'
                        r'[^}]*response_code="401"', gm) is not None, "the inbound proxy reports requests as destination")

        # WebSocket: the upgrade goes through, then bytes flow both ways on the same connection.
        import socket
        with socket.create_connection((host, int(p)), timeout=5) as s:
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: web.mesh\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            rest = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
            check(head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head,
                  f"WebSocket upgrade answered 101 with the origin's accept key: {head[:40]!r}")
            s.sendall(b"hello over the upgraded connection")
            echoed = rest
            while len(echoed) < 34:
                chunk = s.recv(4096)
                if not chunk:
                    break
                echoed += chunk
            check(echoed == b"HELLO OVER THE UPGRADED CONNECTION", f"bytes flow after the upgrade: {echoed!r}")

        # Garbage on the listener: 400, and the listener carries on.
        with socket.create_connection((host, int(p)), timeout=5) as s:
            s.sendall(b"\x16\x03\x01 this is no http\r\n\r\n")
            answer = s.recv(200)
        check(answer.startswith(b"HTTP/1.1 400"), f"garbage gets a 400: {answer[:30]!r}")

        # Metrics and access log.
        c = http.client.HTTPConnection(admin, timeout=5)
        c.request("GET", "/metrics")
        metrics = c.getresponse().read().decode()
        open(os.path.join(work, "metrics.txt"), "w").write(metrics)
        check(re.search(r'istio_requests_total\{reporter="source",source_principal="spiffe://l7.test/ns/default/sa/client",'
                        r'destination_principal="spiffe://l7.test/ns/default/sa/server",destination_service="echo",'
                        r'connection_security_policy="mutual_tls",request_protocol="http",response_code="200",'
                        r'response_flags="-"\} \d+', metrics) is not None, "istio_requests_total with labels")
        check('response_code="429",response_flags="RL"' in metrics and
              'response_code="503",response_flags="UO"' in metrics,
              "429 and breaker 503s counted with their response flags")
        overflows = re.search(r'weft_http_breaker_overflows_total\{service="narrow"\} (\d+)', metrics)
        ejections = re.search(r'weft_http_outlier_ejections_total\{service="outlier"\} (\d+)', metrics)
        check(overflows and int(overflows.group(1)) >= 3 and ejections and int(ejections.group(1)) >= 1 and
              re.search(r'weft_http_endpoint_available\{service="echo",endpoint="[^"]+"\} 1', metrics) and
              'weft_http_upstream_requests_active{service="narrow"} 0' in metrics,
              f"breaker overflows, outlier ejections and endpoint state exported: "
              f"{overflows and overflows.group(0)}, {ejections and ejections.group(0)}")
        check(re.search(r'istio_request_duration_milliseconds_bucket\{[^}]*destination_service="echo"[^}]*le="\+Inf"\} \d+',
                        metrics) is not None and "istio_request_bytes_sum" in metrics and
              "istio_response_bytes_count" in metrics, "duration and size histograms")
        log = [json.loads(l) for l in open(os.path.join(work, "client.log")) if l.startswith("{")]
        reqs = [l for l in log if l.get("method")]
        check(len(reqs) > 300 and all(l.get("trace_id") and l.get("status") for l in reqs),
              f"one access log line per request with status and trace_id: {len(reqs)}")
        retried_lines = [l for l in reqs if l.get("route") == "flaky-retried" and l.get("attempts", 0) > 1]
        check(len(retried_lines) >= 10, f"retried requests log their attempts: {len(retried_lines)}")
    finally:
        rc = h.finish(["client.log", "server.log", "guard.log"], "L7 HTTP")
    return rc


if __name__ == "__main__":
    sys.exit(main())
