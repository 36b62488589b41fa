"""See checks-footprint.sh."""

import argparse
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import CLK_TCK, Figures, wait  # noqa: E402
from agent_footprint import rss_kib, switches, ticks, tree  # noqa: E402

RULES = ["agent/rules/kernel.yaml", "agent/rules/containerd.yaml", "agent/rules/kubelet.yaml"]


def conditions(sock):
    """The agent's conditions, from its socket."""
    import http.client
    import json
    import socket as sk

    class Unix(http.client.HTTPConnection):
        def connect(self):
            self.sock = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
            self.sock.connect(sock)

    c = Unix("localhost")
    c.request("GET", "/v1/conditions")
    return json.loads(c.getresponse().read())["items"]


class Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


def start_containerd(d):
    cfg = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, check=True).stdout
    cfg = (cfg.replace('root = "/var/lib/containerd"', f'root = "{d}/root"')
           .replace('state = "/run/containerd"', f'state = "{d}/state"')
           .replace('address = "/run/containerd/containerd.sock"', f'address = "{d}/containerd.sock"')
           .replace('address = "/run/containerd/debug.sock"', f'address = "{d}/debug.sock"'))
    with open(f"{d}/config.toml", "w") as f:
        f.write(cfg)
    p = subprocess.Popen(["containerd", "--config", f"{d}/config.toml"],
                         stdout=open(f"{d}/containerd.log", "w"), stderr=subprocess.STDOUT)
    wait("containerd", 30, 0.1, lambda: os.path.exists(f"{d}/containerd.sock"))
    return p


class Machine:
    """A Debian container booted with systemd (scripts/lab), with kubelet- and
    containerd-named units so the unit probes have something to ask."""

    def __init__(self, d):
        self.root = f"{d}/root"
        subprocess.run(["scripts/lab/systemd-rootfs.sh", self.root], check=True, stdout=subprocess.DEVNULL)
        for u in ["kubelet", "containerd"]:
            with open(f"{self.root}/etc/systemd/system/{u}.service", "w") as f:
                f.write("[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n")
            os.makedirs(f"{self.root}/etc/systemd/system/multi-user.target.wants", exist_ok=True)
            os.symlink(f"/etc/systemd/system/{u}.service",
                       f"{self.root}/etc/systemd/system/multi-user.target.wants/{u}.service")
        self.name = f"nk-bench-checks-{os.getpid()}"
        self.nspawn = subprocess.Popen(
            ["setsid", "systemd-nspawn", "-D", self.root, "-M", self.name, "--boot", "--register=no",
             "--keep-unit", "--console=pipe", "--private-network"],
            stdin=subprocess.DEVNULL, stdout=open(f"{d}/nspawn.log", "w"), stderr=subprocess.STDOUT)
        _, self.pid1 = wait("the container's systemd", 60, 0.1, self._pid1)
        wait("systemd running", 60, 0.2, lambda: subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", "systemctl", "is-system-running"],
            capture_output=True, text=True).stdout.strip() in ("running", "degraded"))
        self.bus = f"unix:path=/proc/{self.pid1}/root/run/dbus/system_bus_socket"

    def _pid1(self):
        out = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                             capture_output=True, text=True).stdout.strip()
        return int(out) if out else None

    def stop(self):
        subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", "systemctl", "poweroff"], capture_output=True)
        try:
            self.nspawn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
        for base in ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]:
            out = subprocess.run(["find", base, "-depth", "-type", "d", "-path", f"*{self.name}*"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                try:
                    os.rmdir(line)
                except OSError:
                    pass


def measure(fig, label, binary, tmp, detectors, env, idle_s):
    slug = label.replace(" ", "-")
    d = f"{tmp}/{slug}"
    os.makedirs(d)
    cfg = f"{d}/agent.yaml"
    with open(cfg, "w") as f:
        f.write(f"nodeName: checks-{slug}\nstateDir: {d}/state\nsocket: {d}/agent.sock\nlogLevel: warn\n{detectors}")
    agent = subprocess.Popen([f"{binary}/nodekeeper-agent", "--config", cfg], env={**os.environ, **env},
                             stdout=open(f"{d}/agent.log", "w"), stderr=subprocess.STDOUT)
    try:
        if wait("agent socket", 30, 0.1, lambda: os.path.exists(f"{d}/agent.sock"))[0] is None:
            with open(f"{d}/agent.log") as f:
                sys.exit(f"the agent did not start: {f.read()[-2000:]}")
        time.sleep(15)  # settle: the kernel log's lookback, the first checks
        pids = tree(agent.pid)
        rss = sum(rss_kib(p) for p in pids) / 1024
        c0, s0, t0 = ticks(pids), switches(pids), time.monotonic()
        time.sleep(idle_s)
        pids = tree(agent.pid)
        c1, s1, t1 = ticks(pids), switches(pids), time.monotonic()
        cpu = (c1 - c0) / CLK_TCK / (t1 - t0) * 100
        wake = (s1 - s0) / (t1 - t0)
        fig(f"{label}: RSS, agent and helpers", f"{rss:.1f}", "MiB")
        fig(f"{label}: idle CPU", f"{cpu:.3f}", f"% of one core over {idle_s} s")
        fig(f"{label}: wake-ups", f"{wake:.2f}", "per second (context switches, all threads)")
        # Which checks were at work: their conditions, by source.
        seen = sorted({f"{c['type']}@{c['source']}={c['status']}" for c in conditions(f"{d}/agent.sock")
                       if not c["source"].endswith("-monitor")})
        fig(f"{label}: check conditions", f"{len(seen)}", f"({', '.join(seen) or 'none'})")
        return rss, cpu
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    args = ap.parse_args()
    idle_s = int(os.environ.get("IDLE_SECONDS", "120"))
    record = os.environ.get("NO_RECORD") != "1"
    fig = Figures()
    # An interrupted run still stops its container and containerd.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("interrupted"))
    tmp = tempfile.mkdtemp(prefix="nk-checks-")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    os.makedirs(f"{tmp}/containerd")
    containerd = start_containerd(f"{tmp}/containerd")
    machine = Machine(tmp)
    try:
        rules = "".join(f"  - {os.path.abspath(r)}\n" for r in RULES)
        base_rss, base_cpu = measure(fig, "rules only", args.bin, tmp,
                                     f"detectors:\n  defaultRules: false\n  logMonitors:\n{rules}", {}, idle_s)
        # The built-in checks, with kubelet's and containerd's probes pointed at
        # the stand-in and the bench's containerd (same names replace the
        # built-in ones; everything else as shipped).
        port = srv.server_address[1]
        active = (f"detectors:\n  defaultRules: true\n  probes:\n"
                  f"  - {{name: kubelet, condition: KubeletUnhealthy, http: {{url: 'http://127.0.0.1:{port}/healthz'}}, "
                  f"periodSeconds: 10, timeoutSeconds: 5, failureThreshold: 3}}\n"
                  f"  - {{name: containerd, condition: ContainerRuntimeUnhealthy, containerd: "
                  f"{{address: '{tmp}/containerd/containerd.sock', namespace: k8s.io}}, periodSeconds: 10, "
                  f"timeoutSeconds: 5, failureThreshold: 3}}\n")
        rss, cpu = measure(fig, "rules and default checks", args.bin, tmp, active,
                           {"DBUS_SYSTEM_BUS_ADDRESS": machine.bus}, idle_s)
        fig("default checks add: CPU", f"{cpu - base_cpu:.3f}", "% of one core (target: at most 1 %)")
        fig("default checks add: RSS", f"{rss - base_rss:.1f}", "MiB (target: at most 5 MiB)")
    finally:
        machine.stop()
        containerd.terminate()
        containerd.wait(timeout=30)
        srv.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if record:
        fig.record("Default checks' cost", "scripts/bench/checks-footprint.sh", f"idle {idle_s} s each",
                   "release build, standalone; rules only vs the built-in rules and checks, with kubelet's "
                   "healthz on a stand-in HTTP server, a real containerd 1.6 and the unit probes asking a "
                   "real systemd (booted in a container) over D-Bus")


if __name__ == "__main__":
    main()
