"""Helpers shared by the benchmark drivers in this folder. Standard library only."""

import datetime
import http.client as httpclient
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, method="GET", body=None, timeout=30):
    req = urllib.request.Request(url, method=method, data=body.encode() if body else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def proc_mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def wait(what, timeout, poll, cond):
    """Polls `cond` until it gives something true: (seconds, value), or (None, None) on timeout."""
    start = time.monotonic()
    while True:
        v = cond()
        if v:
            return time.monotonic() - start, v
        if time.monotonic() - start > timeout:
            print(f"!! timed out after {timeout}s waiting for {what}", file=sys.stderr)
            return None, None
        time.sleep(poll)


def kill_all(procs):
    """SIGKILL every process and reap it."""
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        except Exception:
            pass


def keep_logs(procs, tmp):
    """Ends the benchmark's processes and keeps their logs (not the stores) beside `tmp`."""
    kill_all(procs)
    logs = tmp + "-logs"
    shutil.copytree(tmp, logs, ignore=shutil.ignore_patterns("*.db*"), dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"(logs kept in {logs})")


class Figures:
    """Figures printed as they are measured and appended to BENCHMARKS.md."""

    def __init__(self):
        self.lines = []

    def __call__(self, name, value, unit=""):
        line = f"{name}: {value}{(' ' + unit) if unit else ''}"
        print(line, flush=True)
        self.lines.append(line)

    def record(self, title, command, params, setup):
        if not self.lines:
            return
        with open("/proc/meminfo") as f:
            memtotal = int(f.readline().split()[1]) / 2**20
        model = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open("BENCHMARKS.md", "a") as f:
            f.write(f"\n### {title} — {datetime.date.today().isoformat()} (commit {commit})\n\n")
            f.write(f"Command: `{command}` ({params})  \n")
            f.write(f"Machine: {os.cpu_count()} cores ({model}), {memtotal:.1f} GiB memory; {setup}\n\n")
            for line in self.lines:
                f.write(f"- {line}\n")


def ok(url):
    """True when `url` answers."""
    try:
        http(url, timeout=2)
        return True
    except Exception:
        return False


class BenchHub:
    """A hub on a fresh store in `tmp` (loopback ports), startable again on the same state.

    With `tls` (the default, and what a real hub runs) the hub creates its PKI and admin token, API
    calls go over HTTPS with that token, and hollow agents join with a join token; `tls=False` runs
    it `insecure: true`, for the side-by-side figures."""

    def __init__(self, bin_dir, tmp, extra="", tls=None):
        if tls is None:
            tls = os.environ.get("TLS", "1") != "0"
        self.bin_dir, self.tmp, self.tls = bin_dir, tmp, tls
        self.grpc_port, self.http_port = free_port(), free_port()
        scheme = "https" if tls else "http"
        self.http = f"{scheme}://127.0.0.1:{self.http_port}"
        self.grpc = f"{scheme}://127.0.0.1:{self.grpc_port}"
        self.cfg = os.path.join(tmp, "hub.yaml")
        self.ca = os.path.join(tmp, "state", "ca.crt")
        self.ctx, self.token, self._join = None, None, None
        with open(self.cfg, "w") as f:
            f.write(f'listen: {{grpc: "127.0.0.1:{self.grpc_port}", http: "127.0.0.1:{self.http_port}"}}\n'
                    f"stateDir: {tmp}/state\nlogLevel: warn\n{'' if tls else 'insecure: true' + chr(10)}{extra}")

    def start(self):
        """Starts the hub and waits for /healthz; returns the process."""
        p = subprocess.Popen([f"{self.bin_dir}/nodekeeper-hub", "--config", self.cfg],
                             stdout=open(os.path.join(self.tmp, "hub.log"), "a"), stderr=subprocess.STDOUT)
        if self.tls:
            token = os.path.join(self.tmp, "state", "admin.token")
            wait("hub PKI and admin token", 30, 0.05, lambda: os.path.exists(self.ca) and os.path.exists(token) and os.path.getsize(token) > 0)
            self.ctx = ssl.create_default_context(cafile=self.ca)
            with open(token) as f:
                self.token = f.read().strip()
        wait("hub /healthz", 30, 0.05, lambda: self.ok("/healthz"))
        return p

    def headers(self):
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, path, method="GET", body=None, timeout=30):
        """An operator API call (as admin when TLS is on); the body of the answer."""
        req = urllib.request.Request(self.http + path, method=method, data=body.encode() if body else None,
                                     headers=self.headers())
        with urllib.request.urlopen(req, timeout=timeout, context=self.ctx) as r:
            return r.read().decode()

    def get(self, path):
        """An operator API GET, parsed."""
        return json.loads(self.request(path))

    def metric(self, name, label=""):
        """The sum of the hub's samples of metric `name` whose labels contain `label`."""
        total = 0.0
        for line in self.request("/metrics").splitlines():
            if line.startswith(name) and label in line and not line.startswith("#"):
                total += float(line.split()[-1])
        return total

    def ok(self, path):
        try:
            self.request(path, timeout=2)
            return True
        except Exception:
            return False

    def connection(self, timeout=10):
        """A kept-alive connection to the API (HTTPS when TLS is on)."""
        hostport = f"127.0.0.1:{self.http_port}"
        if self.tls:
            return httpclient.HTTPSConnection(hostport, timeout=timeout, context=self.ctx)
        return httpclient.HTTPConnection(hostport, timeout=timeout)

    def hollow_args(self):
        """`nodekeeper-agent hollow` arguments to reach this hub: a join token and the CA pin, or --insecure."""
        if not self.tls:
            return ["--hub", self.grpc, "--insecure"]
        if self._join is None:
            self._join = json.loads(self.request("/v1/tokens", "POST", '{"type":"join","ttl":"24h"}'))
        return ["--hub", self.grpc, "--token", self._join["token"], "--ca-cert-hash", self._join["caCertHash"]]

    def nkctl_args(self):
        """nkctl's arguments to reach this hub."""
        args = ["--hub", self.http]
        if self.tls:
            args += ["--token", self.token, "--ca", self.ca]
        return args


def bench_args():
    """The arguments every hub benchmark driver takes: --bin (the build's directory) and --count;
    TLS=0 in the environment runs the hub insecure (plaintext, no tokens)."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--count", type=int, default=10000)
    return ap.parse_args()
