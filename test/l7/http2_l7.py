#!/usr/bin/python3
"""HTTP/2 (prior-knowledge h2c) into a Weft L7 listener, through two proxies on loopback.

client --h2c--> weft (outbound, protocol: http) --HBONE/mTLS--> weft (inbound, http) --> origins

Clients are independent HTTP/2 implementations: python3-h2 (multiplexing, flow control, cookie
splitting, a reset stream, bad framing), and nghttp and h2load from nghttp2-client.
usage: http2_l7.py path/to/weft
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import time
import subprocess
import sys

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
HERE = os.path.dirname(os.path.abspath(__file__))
TD = "h2.test"
sys.path.insert(0, HERE)
from harness import Harness, wait_for  # noqa: E402

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402


class H2Client:
    """A small blocking HTTP/2 client over one connection; many streams at once."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=20)
        # Outbound validation off: the test sends a CONNECT the way a hostile client could.
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self.sock.sendall(self.conn.data_to_send())
        self.responses = {}

    def send(self, path, method="GET", headers=(), body=None, authority="web.mesh", end=True):
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"),
                (":authority", authority)] + list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=body is None and end)
        self.responses[sid] = {"headers": {}, "body": b"", "done": False, "reset": None}
        if body is not None:
            self.pending = getattr(self, "pending", {})
            self.pending[sid] = body
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def _push_bodies(self):
        for sid, body in list(getattr(self, "pending", {}).items()):
            while body:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if window <= 0:
                    break
                self.conn.send_data(sid, body[:window])
                body = body[window:]
            if body:
                self.pending[sid] = body
            else:
                self.conn.end_stream(sid)
                del self.pending[sid]
        self.sock.sendall(self.conn.data_to_send())

    def wait(self, sids):
        self._push_bodies()
        while not all(self.responses[s]["done"] for s in sids):
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the proxy closed the connection")
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.responses[ev.stream_id]["headers"] = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h2.events.DataReceived):
                    self.responses[ev.stream_id]["body"] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.responses[ev.stream_id]["done"] = True
                elif isinstance(ev, h2.events.StreamReset):
                    self.responses[ev.stream_id].update(done=True, reset=ev.error_code)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = ev
            self._push_bodies()
        return [self.responses[s] for s in sids]

    def read_to_end(self):
        """Reads (and handles) what the proxy still sends until it closes the connection."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = ev

    def close(self):
        self.sock.close()


def main():
    h = Harness(WEFT, "weft-h2-", TD)
    check = h.check
    try:
        h.pki("client", "server")
        port = h.origins(HERE, "a", "b")
        targets = "".join(f"    - {{authority: '{n}:80', address: '127.0.0.1:{p}', protocol: http}}\n"
                          for n, p in port.items())
        _, server = h.proxy("server", h.identity("server") + "admin: {listen: 127.0.0.1:0}\n"
                            "inbound:\n  listen: 127.0.0.1:0\n  targets:\n" + targets)
        sid = f"spiffe://{TD}/ns/default/sa/server"
        services = "services:\n" + "".join(
            f"  - name: {n}\n    spiffe_ids: ['{sid}']\n"
            f"    endpoints: [{{address: '{server['inbound']}', authority: '{n}:80'}}]\n" for n in ("a", "b"))
        admin, client = h.proxy(
            "client", h.identity("client") + "admin: {listen: 127.0.0.1:0}\n" + services +
            "outbound:\n  - name: web\n    listen: 127.0.0.1:0\n    protocol: http\n    routes:\n"
            "      - {name: to-b, match: {path: {prefix: /b/}}, service: b}\n"
            "      - {name: limited, match: {path: {prefix: /limited}}, service: a,"
            " rate_limit: {per_second: 1, burst: 1}}\n"
            "      - {name: posts, match: {method: POST}, service: a, retries: {attempts: 0}}\n"
            "      - {name: rest, match: {path: {prefix: /}}, service: a,"
            " response_headers: {add: {x-served-by: weft}}}\n")
        host, p = client["outbound/web"].rsplit(":", 1)
        p = int(p)

        c = H2Client(host, p)
        # Many streams at once on one connection, routed per stream.
        sids = [c.send(f"/{'b' if i % 2 else 'a'}/{i}") for i in range(40)]
        res = c.wait(sids)
        ok = all(r["headers"].get(":status") == "200" for r in res)
        origins_right = all(json.loads(r["body"])["origin"] == ("b" if i % 2 else "a")
                            and json.loads(r["body"])["path"] == f"/{'b' if i % 2 else 'a'}/{i}"
                            for i, r in enumerate(res) if r["body"])
        check(ok and origins_right, "40 concurrent streams on one connection, each routed by path to its origin")
        first = json.loads(res[0]["body"])
        check(res[0]["headers"].get("x-served-by") == "weft" and "connection" not in res[0]["headers"],
              f"response headers rewritten, no connection-specific fields: {sorted(res[0]['headers'])}")
        check(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first["headers"].get("traceparent", "")) is not None
              and first["headers"].get("host") == "web.mesh",
              f"the origin sees :authority as Host and a traceparent: {first['headers']}")

        # Request bodies larger than the stream window, with and without content-length.
        body = os.urandom(700 * 1024)
        s1 = c.send("/post", method="POST", body=body)
        s2 = c.send("/post", method="POST", body=body, headers=[("content-length", str(len(body)))])
        r1, r2 = c.wait([s1, s2])
        check(r1["headers"].get(":status") == "200" and json.loads(r1["body"])["body_bytes"] == len(body),
              "a 700 KiB POST without content-length arrives whole (flow control, chunked to the session)")
        check(r2["headers"].get(":status") == "200" and json.loads(r2["body"])["body_bytes"] == len(body),
              "a 700 KiB POST with content-length arrives whole")

        # A large response streams through the client's flow control.
        s = c.send("/big?size=5000000")
        (r,) = c.wait([s])
        expect = (bytes(range(256)) * 256 * 77)[:5000000]
        check(r["headers"].get(":status") == "200" and r["body"] == expect,
              f"a 5 MB response arrives intact ({len(r['body'])} bytes)")

        # Cookies split over several fields are joined for HTTP/1.1 (RFC 9113 8.2.3).
        s = c.send("/cookie", headers=[("cookie", "x=1"), ("cookie", "y=2")])
        (r,) = c.wait([s])
        check(json.loads(r["body"])["headers"].get("cookie") == "x=1; y=2",
              f"split cookies joined: {json.loads(r['body'])['headers'].get('cookie')!r}")

        # Per-stream L7 policy: the rate limiter answers 429 on the second stream.
        s1, s2 = c.send("/limited/1"), c.send("/limited/2")
        statuses = sorted(x["headers"].get(":status") for x in c.wait([s1, s2]))
        check(statuses == ["200", "429"], f"rate limit per stream: {statuses}")

        # :authority is the Host routes see.
        s = c.send("/x", authority="elsewhere")
        (r,) = c.wait([s])
        check(r["headers"].get(":status") == "200", "any host matches the catch-all route")

        # A stream the client resets mid-response leaves the others alone.
        big = c.send("/big?size=20000000")
        c.conn.reset_stream(big)
        c.sock.sendall(c.conn.data_to_send())
        c.responses[big]["done"] = True
        s = c.send("/a/after-reset")
        (r,) = c.wait([s])
        check(r["headers"].get(":status") == "200", "a reset stream does not disturb the next one")

        # CONNECT is not proxied on an HTTP listener.
        sid_c = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid_c, [(":method", "CONNECT"), (":authority", "example.com:443")])
        c.responses[sid_c] = {"headers": {}, "body": b"", "done": False, "reset": None}
        c.sock.sendall(c.conn.data_to_send())
        (r,) = c.wait([sid_c])
        check(r["headers"].get(":status") == "405", f"CONNECT refused: {r['headers'].get(':status')}")
        c.close()

        # Bad framing after the preface closes that connection only.
        bad = socket.create_connection((host, p), timeout=10)
        bad.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09\x00\x00\x00\x00\x00garbage!" * 4)
        rest, closed = b"", False
        try:
            while True:
                more = bad.recv(65536)
                if not more:
                    closed = True
                    break
                rest += more
        except ConnectionResetError:
            closed = True
        except socket.timeout:
            pass
        types, i = [], 0
        while i + 9 <= len(rest):
            types.append(rest[i + 3])
            i += 9 + int.from_bytes(rest[i:i + 3], "big")
        check(closed and 7 in types,
              f"bad frames after the preface: GOAWAY and the connection closed (frame types {types})")
        bad.close()

        # HTTP/1.1 still works on the same listener.
        hc = http.client.HTTPConnection(host, p, timeout=10)
        hc.request("GET", "/b/plain", headers={"host": "web.mesh"})
        r = hc.getresponse()
        check(r.status == 200 and json.loads(r.read())["origin"] == "b", "HTTP/1.1 on the same listener")

        # nghttp2's own tools as clients.
        nghttp, h2load = shutil.which("nghttp"), shutil.which("h2load")
        if not nghttp or not h2load:
            check(False, "nghttp and h2load are installed (scripts/install-deps: nghttp2-client)")
        else:
            out = subprocess.run([nghttp, "-v", f"http://{host}:{p}/b/nghttp"], capture_output=True,
                                 text=True, timeout=30).stdout
            check(":status: 200" in out and '"origin": "b"' in out, "nghttp GET through the mesh")
            out = subprocess.run([h2load, "-n", "2000", "-c", "4", "-m", "10", f"http://{host}:{p}/a/load"],
                                 capture_output=True, text=True, timeout=120).stdout
            m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
            codes = re.search(r"status codes: (\d+) 2xx", out)
            check(bool(m) and m.group(3) == "2000" and codes and codes.group(1) == "2000",
                  "h2load: 2000 requests over 4 connections × 10 streams, all 2xx: "
                  + (m.group(0) if m else out[-300:]))

        # Every stream is a request in the metrics and the access log, as HTTP/2.
        def metric():
            try:
                mc = http.client.HTTPConnection(admin, timeout=5)
                mc.request("GET", "/metrics")
                text = mc.getresponse().read().decode()
            except OSError:
                return None
            return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                       if l.startswith("istio_requests_total{") and 'reporter="source"' in l)
        n = wait_for("request metrics", metric)
        check(n >= 2040, f"istio_requests_total counts the HTTP/2 streams: {n}")
        log = [json.loads(l) for l in open(os.path.join(h.work, "client.log")) if l.startswith("{")]
        h2_lines = [l for l in log if l.get("protocol") == "http/2" and l.get("method")]
        check(len(h2_lines) >= 2040, f"access log lines with protocol http/2: {len(h2_lines)}")

        # Drain (SIGTERM), with a slow request in flight on each protocol: the HTTP/1.1 answer
        # says Connection: close; the HTTP/2 connection gets GOAWAY(NO_ERROR) and its stream is
        # still answered; an idle kept-alive connection is closed after a short grace. Then
        # the proxy exits without waiting out its 15 s drain timeout.
        # Each connection answers a first request, so the proxy holds it (not its accept queue).
        idle = http.client.HTTPConnection(host, p, timeout=10)
        idle.request("GET", "/a/idle", headers={"host": "web.mesh"})
        idle.getresponse().read()
        hc = http.client.HTTPConnection(host, p, timeout=10)
        hc.request("GET", "/a/warm", headers={"host": "web.mesh"})
        hc.getresponse().read()
        hc.request("GET", "/a/slow-h1?sleep=1500", headers={"host": "web.mesh"})
        c2 = H2Client(host, p)
        c2.wait([c2.send("/a/warm")])
        slow = c2.send("/a/slow-h2?sleep=1500")

        # Both slow requests are in the proxy's hands before SIGTERM (else the GOAWAY rightly
        # names an earlier last stream, and the client would retry it elsewhere).
        def both_in_flight():
            mc = http.client.HTTPConnection(admin, timeout=5)
            mc.request("GET", "/metrics")
            return 'weft_http_upstream_requests_active{service="a"} 2' in mc.getresponse().read().decode()
        wait_for("both slow requests in flight", both_in_flight)
        client_proc = h.procs[-1]
        t0 = time.time()
        client_proc.send_signal(signal.SIGTERM)
        r = hc.getresponse()
        r.read()
        check(r.status == 200 and r.getheader("connection", "").lower() == "close",
              f"draining: the in-flight HTTP/1.1 request is answered ({r.status}) with Connection: "
              f"{r.getheader('connection')}")
        # Read as raw frames: python3-h2 closes its state machine on any GOAWAY, even one that
        # (as RFC 9113 6.8 intends) precedes the answers to the streams it still covers.
        raw = b""
        try:
            while True:
                more = c2.sock.recv(65536)
                if not more:
                    break
                raw += more
        except ConnectionResetError:
            pass
        frames, i = [], 0
        while i + 9 <= len(raw):
            n = int.from_bytes(raw[i:i + 3], "big")
            frames.append((raw[i + 3], raw[i + 4], int.from_bytes(raw[i + 5:i + 9], "big") & 0x7FFFFFFF,
                           raw[i + 9:i + 9 + n]))
            i += 9 + n
        goaways = [f for f in frames if f[0] == 7]
        answered = any(f[0] == 1 and f[2] == slow and f[3][:1] == b"\x88" for f in frames)  # :status 200
        ended = any(f[2] == slow and f[1] & 1 and f[0] in (0, 1) for f in frames)
        check(bool(goaways) and int.from_bytes(goaways[0][3][4:8], "big") == 0
              and int.from_bytes(goaways[0][3][:4], "big") >= slow and answered and ended,
              f"draining: GOAWAY(NO_ERROR) covering the in-flight stream, which is answered 200 and "
              f"ended (frames {[(f[0], f[1], f[2], f[3][:8].hex()) for f in frames]})")
        idle.sock.settimeout(10)
        check(idle.sock.recv(1) == b"", "draining: the idle kept-alive connection is closed")
        wait_for("the drained proxy to exit", lambda: client_proc.poll() is not None, timeout=20)
        check(time.time() - t0 < 10,
              f"the drained proxy exited {time.time() - t0:.1f} s after SIGTERM (drain timeout 15 s)")
    except Exception as e:  # noqa: BLE001 -- any failure is reported as one, with its type
        check(False, f"{type(e).__name__}: {e}")
    finally:
        rc = h.finish(["client.log", "server.log", "origins.log"], "HTTP/2 downstream")
    return rc


if __name__ == "__main__":
    sys.exit(main())
