#!/usr/bin/python3
"""Interop: an independent HTTP/2 stack (python3-h2 + Python's ssl) speaks HBONE to weft's
inbound listener. Proves the wire format is standard HTTP/2 CONNECT over mTLS, not just
self-consistent, and checks every refusal from the outside: 401, 400, 503, no/expired/foreign
client certificates; no refused request may reach the app.

Usage: hbone_interop.py WEFT_BINARY.  Exit 0 pass, 1 fail, 77 skip (python3-h2 missing)."""
import os, socket, ssl, subprocess, sys, tempfile, threading, time, urllib.request

try:
    import h2.config, h2.connection, h2.events
except ImportError:
    print("SKIP: python3-h2 is not installed (scripts/install-deps installs it)", flush=True)
    sys.exit(77)

WEFT = sys.argv[1]
failures = []
passes = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    (passes if cond else failures).append(what)


def weft(*args):
    r = subprocess.run([WEFT, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit("weft %s failed: %s%s" % (" ".join(args), r.stdout, r.stderr))


class EchoApp:
    """The app behind the proxy: counts connections so refusals can prove nothing got through."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            c, _ = self.sock.accept()
            self.accepted += 1
            threading.Thread(target=self.echo, args=(c,), daemon=True).start()

    @staticmethod
    def echo(c):
        while True:
            d = c.recv(65536)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)


def tls_connect(port, cert_dir, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the SPIFFE URI SAN, checked below, not a DNS name
    ctx.load_verify_locations(ca)
    if cert_dir:
        ctx.load_cert_chain(os.path.join(cert_dir, "cert.pem"), os.path.join(cert_dir, "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw)
    return s


class Client:
    def __init__(self, sock):
        self.sock = sock
        # h2 4.1 insists on :scheme/:path for every request, but RFC 9113 §8.5 forbids them on
        # CONNECT; turn off its outbound check so the request is exactly what ztunnel sends.
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.pending = []  # events read while sending
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def connect(self, authority):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority.encode())])
        self.flush()
        return sid

    def pump(self, until):
        """Reads events until until(events_so_far) is true; returns all events."""
        events, self.pending = self.pending, []
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.flush()
        while not until(events):
            data = self.sock.recv(65536)
            if not data:
                break
            for ev in self.conn.receive_data(data):
                events.append(ev)
                if isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            self.flush()
        return events

    def send_all(self, sid, data):
        """Sends within the peer's flow-control windows, reading WINDOW_UPDATEs as needed."""
        while data:
            n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n == 0:
                for ev in self.conn.receive_data(self.sock.recv(65536)):
                    self.pending.append(ev)
                self.flush()
                continue
            self.conn.send_data(sid, data[:n])
            data = data[n:]
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def status(self, sid):
        evs = self.pump(lambda es: any(getattr(e, "stream_id", None) == sid and
                                       isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset)) for e in es))
        for e in evs:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                return int(dict(e.headers)[b":status"])
        return None


def main():
    tmp = tempfile.mkdtemp(prefix="weft-interop-")
    td = "interop.local"
    weft("ca", "init", "--trust-domain", td, "--out", f"{tmp}/ca")
    weft("ca", "init", "--trust-domain", td, "--out", f"{tmp}/foreign-ca")
    for who in ("client", "server", "other"):
        weft("cert", "issue", "--ca", f"{tmp}/ca", "--spiffe-id", f"spiffe://{td}/ns/default/sa/{who}", "--out", f"{tmp}/{who}")
    weft("cert", "issue", "--ca", f"{tmp}/ca", "--spiffe-id", f"spiffe://{td}/ns/default/sa/client",
         "--out", f"{tmp}/expired", "--ttl", "1h", "--backdate", "48h")
    weft("cert", "issue", "--ca", f"{tmp}/foreign-ca", "--spiffe-id", f"spiffe://{td}/ns/default/sa/client", "--out", f"{tmp}/foreign")

    app = EchoApp()
    dead = socket.socket(); dead.bind(("127.0.0.1", 0)); dead_port = dead.getsockname()[1]; dead.close()
    target, dead_target = f"127.0.0.1:{app.port}", f"127.0.0.1:{dead_port}"
    with open(f"{tmp}/b.yaml", "w") as f:
        f.write(f"""identity: {{cert: {tmp}/server/cert.pem, key: {tmp}/server/key.pem, ca: {tmp}/server/ca.crt}}
workers: 2
admin: {{listen: 127.0.0.1:0}}
inbound:
  listen: 127.0.0.1:0
  targets:
    - {{authority: "{target}", address: "{target}", allow: [spiffe://{td}/ns/default/sa/client]}}
    - {{authority: "{dead_target}", address: "{dead_target}"}}
""")
    proc = subprocess.Popen([WEFT, "proxy", "-c", f"{tmp}/b.yaml", "--admin-address-path", f"{tmp}/admin"],
                            stdout=open(f"{tmp}/access.log", "w"), stderr=open(f"{tmp}/proxy.log", "w"))
    try:
        deadline = time.time() + 20
        admin = None
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit("proxy exited: " + open(f"{tmp}/proxy.log").read())
            try:
                admin = open(f"{tmp}/admin").read().strip()
                if urllib.request.urlopen(f"http://{admin}/ready", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.02)  # polling interval
        import json
        port = int(json.load(urllib.request.urlopen(f"http://{admin}/listeners"))["inbound"].rsplit(":", 1)[1])
        ca = f"{tmp}/ca/ca.crt"

        # 1. Tunnel data through two concurrent CONNECT streams on one connection.
        s = tls_connect(port, f"{tmp}/client", ca)
        check(s.selected_alpn_protocol() == "h2", "ALPN negotiated h2")
        peer = s.getpeercert()
        sans = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
        check(sans == [f"spiffe://{td}/ns/default/sa/server"], f"server presents its SPIFFE ID ({sans})")
        c = Client(s)
        ids = [c.connect(target), c.connect(target)]
        check([c.status(i) for i in ids] == [200, 200], "CONNECT answered 200 on two streams")
        payload = {ids[0]: os.urandom(300000), ids[1]: b"second stream"}
        for sid, data in payload.items():
            c.send_all(sid, data)
        got = {i: b"" for i in ids}
        ended = set()
        def done(evs):
            for e in evs[len(done.seen):]:
                if isinstance(e, h2.events.DataReceived):
                    got[e.stream_id] += e.data
                if isinstance(e, h2.events.StreamEnded):
                    ended.add(e.stream_id)
            done.seen = list(evs)
            return ended == set(ids)
        done.seen = []
        c.pump(done)
        check(got == payload, "bytes echoed through the tunnel intact, half-close passed on")

        # 2. Refusals on the same connection.
        sid = c.connect("127.0.0.1:1")
        check(c.status(sid) == 400, "unconfigured target answered 400 (not an open proxy)")
        sid = c.connect(dead_target)
        check(c.status(sid) == 503, "target with nothing listening answered 503")
        s.close()
        before = app.accepted
        s = tls_connect(port, f"{tmp}/other", ca)
        c = Client(s)
        sid = c.connect(target)
        check(c.status(sid) == 401, "identity not in the allow list answered 401")
        s.close()

        # 3. Handshake refusals.
        for label, cert_dir in (("no client certificate", None), ("expired certificate", f"{tmp}/expired"),
                                ("certificate from another CA", f"{tmp}/foreign")):
            refused = False
            try:
                s = tls_connect(port, cert_dir, ca)
                c = Client(s)
                sid = c.connect(target)
                refused = c.status(sid) is None
            except (ssl.SSLError, ConnectionError, OSError):
                refused = True
            check(refused, f"{label} is refused")
        check(app.accepted == before, f"no refused request reached the app ({app.accepted - before} did)")
        check(proc.poll() is None, "proxy still running")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if failures:
        print("proxy log:\n" + open(f"{tmp}/proxy.log").read())
    print("interop: %d passed, %d failed" % (len(passes), len(failures)))
    sys.exit(1 if failures else 0)


main()
