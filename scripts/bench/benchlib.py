"""Helpers shared by the benchmark drivers in this folder. Standard library only."""

import datetime
import os
import signal
import socket
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

    Plaintext (`insecure: true`) until the drivers speak TLS and tokens: the
    side-by-side TLS figures of issue 11 are still to be taken."""

    def __init__(self, bin_dir, tmp, extra="insecure: true\n"):
        self.bin_dir, self.tmp = bin_dir, tmp
        self.grpc_port, self.http_port = free_port(), free_port()
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.grpc = f"http://127.0.0.1:{self.grpc_port}"
        self.cfg = os.path.join(tmp, "hub.yaml")
        with open(self.cfg, "w") as f:
            f.write(f'listen: {{grpc: "127.0.0.1:{self.grpc_port}", http: "127.0.0.1:{self.http_port}"}}\n'
                    f"stateDir: {tmp}/state\nlogLevel: warn\n{extra}")

    def start(self):
        """Starts the hub and waits for /healthz; returns the process."""
        p = subprocess.Popen([f"{self.bin_dir}/nodekeeper-hub", "--config", self.cfg],
                             stdout=open(os.path.join(self.tmp, "hub.log"), "a"), stderr=subprocess.STDOUT)
        wait("hub /healthz", 30, 0.05, lambda: ok(f"{self.http}/healthz"))
        return p


def bench_args():
    """The arguments every hub benchmark driver takes: --bin (the build's directory) and --count."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--count", type=int, default=10000)
    return ap.parse_args()
