"""HTTP/1.1 origins for the L7 tests: one thread-per-connection server per name, keep-alive.

usage: origins.py name[:mode] ...   prints "name port" per origin, then serves until killed.
modes: echo (default) answers JSON with its name, the request line, headers and body size;
       flaky fails every second request with 503; bad always answers 500;
       short closes idle keep-alive connections after 0.3 s; sluggish answers every odd-numbered
       request 3 s late.
Any origin honours ?sleep=<ms> (answer late), ?status=<code> and ?size=<bytes> (a body of that
many bytes, streamed in chunks).
"""
import base64
import hashlib
import http.server
import json
import socketserver
import sys
import threading
import time
import urllib.parse


def make_handler(name, mode):
    state = {"n": 0, "lock": threading.Lock()}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.3 if mode == "short" else 30

        def log_message(self, *args):
            pass

        def upgrade(self):
            # Enough of RFC 6455's handshake for a proxy to see an upgrade; then raw echo.
            key = self.headers.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1(
                (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("upgrade", "websocket")
            self.send_header("connection", "Upgrade")
            self.send_header("sec-websocket-accept", accept)
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data.upper())

        def answer(self):
            if self.headers.get("upgrade", "").lower() == "websocket":
                return self.upgrade()
            q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            length = int(self.headers.get("content-length") or 0)
            body_in = self.rfile.read(length) if length else b""
            if "sleep" in q:
                time.sleep(int(q["sleep"][0]) / 1000.0)
            with state["lock"]:
                state["n"] += 1
                n = state["n"]
            if mode == "sluggish" and n % 2 == 1:
                time.sleep(3)
            status = int(q["status"][0]) if "status" in q else 200
            if mode == "flaky" and n % 2 == 0:
                status = 503
            if mode == "bad":
                status = 500
            if "size" in q:
                size = int(q["size"][0])
                self.send_response(status)
                self.send_header("content-length", str(size))
                self.send_header("x-origin", name)
                self.end_headers()
                chunk = bytes(range(256)) * 256
                sent = 0
                while sent < size:
                    piece = chunk[: min(len(chunk), size - sent)]
                    self.wfile.write(piece)
                    sent += len(piece)
                return
            body = json.dumps({"origin": name, "n": n, "method": self.command, "path": self.path,
                               "headers": {k.lower(): v for k, v in self.headers.items()},
                               "body_bytes": len(body_in)}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-origin", name)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    servers = []
    for spec in sys.argv[1:]:
        name, _, mode = spec.partition(":")
        s = Server(("127.0.0.1", 0), make_handler(name, mode or "echo"))
        servers.append(s)
        print(name, s.server_address[1], flush=True)
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
