"""Shared pieces of the L7 tests: a work directory, processes that die with the test, a test
CA with certificates, weft proxies started from YAML and polled until their listeners are up."""
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time


def wait_for(what, fn, timeout=20.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Harness:
    def __init__(self, weft, prefix, trust_domain):
        self.weft = weft
        self.td = trust_domain
        self.work = tempfile.mkdtemp(prefix=prefix)
        self.procs = []
        self.failures = []

    def spawn(self, args, log):
        p = subprocess.Popen([str(a) for a in args], stdout=open(os.path.join(self.work, log), "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def check(self, cond, what):
        print(("ok   " if cond else "FAIL ") + what, flush=True)
        if not cond:
            self.failures.append(what)

    def pki(self, *who):
        ca = os.path.join(self.work, "ca")
        subprocess.run([self.weft, "ca", "init", "--trust-domain", self.td, "--out", ca], check=True,
                       capture_output=True)
        for w in who:
            subprocess.run([self.weft, "cert", "issue", "--ca", ca, "--spiffe-id",
                            f"spiffe://{self.td}/ns/default/sa/{w}", "--out", os.path.join(self.work, w)],
                           check=True, capture_output=True)

    def identity(self, who):
        d = os.path.join(self.work, who)
        return f"identity: {{cert: {d}/cert.pem, key: {d}/key.pem, ca: {d}/ca.crt}}\n"

    def origins(self, here, *names):
        self.spawn(["/usr/bin/python3", os.path.join(here, "origins.py"), *names], "origins.log")
        lines = wait_for("the origins", lambda: (lambda l: "ready\n" in l and l)(
            open(os.path.join(self.work, "origins.log")).readlines()))
        return {l.split()[0]: int(l.split()[1]) for l in lines if l.strip() != "ready"}

    def proxy(self, name, yaml):
        """Starts `weft proxy`; returns (admin address, listeners)."""
        cfg = os.path.join(self.work, f"{name}.yaml")
        open(cfg, "w").write(yaml)
        admin_file = os.path.join(self.work, f"{name}.admin")
        self.spawn([self.weft, "proxy", "-c", cfg, "--admin-address-path", admin_file], f"{name}.log")
        wait_for(f"{name}'s admin address", lambda: os.path.exists(admin_file))
        admin = open(admin_file).read().strip()

        def listeners():
            try:
                c = http.client.HTTPConnection(admin, timeout=2)
                c.request("GET", "/listeners")
                return json.loads(c.getresponse().read())
            except (OSError, ValueError):
                return None
        return admin, wait_for(f"{name}'s listeners", listeners)

    def finish(self, logs, what):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if self.failures:
            for f in logs:
                path = os.path.join(self.work, f)
                if os.path.exists(path):
                    print(f"--- {f}\n" + "".join(open(path).readlines()[-20:]))
        if not os.environ.get("WEFT_KEEP_TEST_DIRS"):
            shutil.rmtree(self.work, ignore_errors=True)
        if self.failures:
            print(f"\nFAIL: {len(self.failures)} check(s): " + "; ".join(self.failures))
            return 1
        print(f"\nPASS: {what}")
        return 0
