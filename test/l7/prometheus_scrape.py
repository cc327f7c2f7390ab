#!/usr/bin/python3
"""A real Prometheus (Debian's) scrapes both proxies of an L7 path and answers queries on
Istio's request metrics: the counter by response code, and a p99 from the duration histogram.
usage: prometheus_scrape.py path/to/weft
"""
import http.client
import json
import os
import shutil
import socket
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Harness, wait_for  # noqa: E402

WEFT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "weft"
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main():
    prom = shutil.which("prometheus")
    if not prom:
        print("SKIP: prometheus missing (scripts/install-deps installs it)")
        return 77
    h = Harness(WEFT, "weft-prom-", "prom.test")
    try:
        h.pki("client", "server")
        port = h.origins(HERE, "a")
        server_admin, server = h.proxy("server", h.identity("server") + "admin: {listen: 127.0.0.1:0}\n"
                                       "inbound:\n  listen: 127.0.0.1:0\n  targets:\n"
                                       f"    - {{authority: 'a:80', address: '127.0.0.1:{port['a']}', protocol: http}}\n")
        client_admin, client = h.proxy(
            "client", h.identity("client") + "admin: {listen: 127.0.0.1:0}\nservices:\n"
            f"  - name: web\n    spiffe_ids: ['spiffe://prom.test/ns/default/sa/server']\n"
            f"    endpoints: [{{address: '{server['inbound']}', authority: 'a:80'}}]\n"
            "outbound:\n  - {name: web, listen: 127.0.0.1:0, service: web, protocol: http}\n")
        host, p = client["outbound/web"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(p), timeout=10)
        for i in range(50):
            c.request("GET", f"/item/{i}" + ("?status=404" if i % 10 == 0 else ""))
            c.getresponse().read()

        prom_port = free_port()
        cfg = os.path.join(h.work, "prometheus.yml")
        open(cfg, "w").write(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: weft\n    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: ['{client_admin}', '{server_admin}']}}]\n")
        h.spawn([prom, f"--config.file={cfg}", f"--storage.tsdb.path={h.work}/tsdb",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], "prometheus.log")

        def query(q):
            try:
                pc = http.client.HTTPConnection("127.0.0.1", prom_port, timeout=5)
                pc.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
                body = json.loads(pc.getresponse().read())
                return body["data"]["result"] if body.get("status") == "success" else None
            except (OSError, ValueError, KeyError):
                return None

        by_code = wait_for("both proxies scraped with requests",
                           lambda: (lambda r: r if r and len(r) >= 4 else None)(
                               query("sum by (reporter, response_code) (istio_requests_total)")),
                           timeout=60)
        got = {(r["metric"]["reporter"], r["metric"]["response_code"]): float(r["value"][1]) for r in by_code}
        h.check(got.get(("source", "200")) == 45 and got.get(("source", "404")) == 5,
                f"the client proxy's counts by code, as Prometheus sees them: {got}")
        h.check(got.get(("destination", "200")) == 45 and got.get(("destination", "404")) == 5,
                "the server proxy reports the same requests as destination")
        p99 = query('histogram_quantile(0.99, sum by (le) (istio_request_duration_milliseconds_bucket{reporter="source"}))')
        h.check(bool(p99) and float(p99[0]["value"][1]) > 0,
                f"a p99 from the duration histogram: {p99 and p99[0]['value'][1]} ms")
        size = query('sum(istio_response_bytes_sum{reporter="source"})')
        h.check(bool(size) and float(size[0]["value"][1]) > 0, "response bytes summed")
        up = query('up{job="weft"}')
        h.check(bool(up) and all(r["value"][1] == "1" for r in up) and len(up) == 2,
                "both targets are up (the exposition format parses)")
    finally:
        rc = h.finish(["client.log", "server.log", "prometheus.log"], "Prometheus scrape")
    return rc


if __name__ == "__main__":
    sys.exit(main())
