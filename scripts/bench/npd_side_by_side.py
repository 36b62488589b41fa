"""See npd-side-by-side.sh. Standard library only."""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import CLK_TCK, Figures, free_port, http, wait  # noqa: E402
from agent_footprint import DevKmsgOn, flood, io, kernel_lines, rss_kib, switches, ticks, tree  # noqa: E402


def counters(url):
    """problem_counter per reason from a Prometheus text endpoint."""
    out = {}
    try:
        text = http(url, timeout=5)
    except Exception:
        return out
    for line in text.splitlines():
        m = re.match(r'problem_counter(?:_total)?\{([^}]*)\}\s+([0-9.eE+]+)', line)
        if not m:
            continue
        reason = re.search(r'reason="([^"]*)"', m.group(1))
        if reason:
            out[reason.group(1)] = out.get(reason.group(1), 0) + float(m.group(2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--npd", required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--npd-version", default="unknown")
    ap.add_argument("--rate", type=int, default=5000)
    args = ap.parse_args()
    idle_s = int(os.environ.get("IDLE_SECONDS", "60"))
    flood_s = int(os.environ.get("FLOOD_SECONDS", "30"))
    record = os.environ.get("NO_RECORD") != "1"
    fig = Figures()
    tmp = tempfile.mkdtemp(prefix="nk-npd-")
    nk_port, npd_port = free_port(), free_port()
    cfg = os.path.join(tmp, "agent.yaml")
    with open(cfg, "w") as f:
        f.write(f"nodeName: side-by-side\nstateDir: {tmp}/state\nsocket: {tmp}/agent.sock\n"
                f"metrics: {{listen: '127.0.0.1:{nk_port}'}}\n"
                f"detectors: {{defaultRules: false, logMonitors: ['{os.path.abspath(args.rules)}']}}\n")
    procs = {
        "nodekeeper": subprocess.Popen([f"{args.bin}/nodekeeper-agent", "--config", cfg],
                                       stdout=open(os.path.join(tmp, "agent.log"), "w"), stderr=subprocess.STDOUT),
        "npd": subprocess.Popen([args.npd, f"--config.system-log-monitor={os.path.abspath(args.rules)}",
                                 "--enable-k8s-exporter=false", "--prometheus-address=127.0.0.1",
                                 f"--prometheus-port={npd_port}", "--hostname-override=side-by-side",
                                 "--logtostderr"],
                                stdout=open(os.path.join(tmp, "npd.log"), "w"), stderr=subprocess.STDOUT),
    }
    urls = {"nodekeeper": f"http://127.0.0.1:{nk_port}/metrics", "npd": f"http://127.0.0.1:{npd_port}/metrics"}
    try:
        def up(u):
            try:
                return http(u, timeout=2) is not None
            except Exception:
                return False
        for name, url in urls.items():
            wait(f"{name} metrics", 60, 0.2, lambda u=url: up(u))
        time.sleep(10)  # both read the ring buffer's lookback
        pids = {n: tree(p.pid) for n, p in procs.items()}
        for n, ps in pids.items():
            fig(f"{n}: idle RSS (with helpers)", f"{sum(rss_kib(p) for p in ps) / 1024:.1f}", "MiB")
        before = {n: (ticks(ps), switches(ps), io(ps)) for n, ps in pids.items()}
        t0 = time.monotonic()
        time.sleep(idle_s)
        dt = time.monotonic() - t0
        for n, ps in pids.items():
            ps = tree(procs[n].pid)
            c, s, _ = ticks(ps), switches(ps), io(ps)
            fig(f"{n}: idle CPU", f"{(c - before[n][0]) / CLK_TCK / dt * 100:.3f}",
                f"% of one core; wake-ups {(s - before[n][1]) / dt:.2f}/s over {idle_s} s")

        lines = kernel_lines(tmp, args.rate, flood_s)
        seen0 = {n: counters(u) for n, u in urls.items()}
        pids = {n: tree(p.pid) for n, p in procs.items()}
        before = {n: (ticks(ps), switches(ps), io(ps)) for n, ps in pids.items()}
        t0 = time.monotonic()
        with DevKmsgOn():
            written = flood(lines, args.rate)
        time.sleep(5)  # both finish reading
        dt = time.monotonic() - t0
        fig("flood: lines written", f"{len(lines)}", f"in {written:.1f} s ({len(lines) / written:.0f} lines/s), both reading")
        for n, ps in pids.items():
            ps = tree(procs[n].pid)
            c, _, w = ticks(ps), switches(ps), io(ps)
            fig(f"{n}: flood CPU", f"{(c - before[n][0]) / CLK_TCK / dt * 100:.2f}",
                f"% of one core; disk writes {(w[0] - before[n][2][0]) / 1024:.0f} KiB, {w[1] - before[n][2][1]} write calls; "
                f"RSS {sum(rss_kib(p) for p in ps) / 1024:.1f} MiB")
        seen1 = {n: counters(u) for n, u in urls.items()}
        found = {n: {r: seen1[n].get(r, 0) - seen0[n].get(r, 0) for r in set(seen0[n]) | set(seen1[n])} for n in urls}
        reasons = sorted(set(found["npd"]) | set(found["nodekeeper"]))
        same = all(found["npd"].get(r, 0) == found["nodekeeper"].get(r, 0) for r in reasons)
        detail = ", ".join(f"{r} {found['npd'].get(r, 0):.0f}/{found['nodekeeper'].get(r, 0):.0f}"
                           for r in reasons if found["npd"].get(r, 0) or found["nodekeeper"].get(r, 0))
        fig("flood: problems counted (reason npd/nodekeeper)", detail or "none", "(same)" if same else "(DIFFERENT)")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
        print(f"(logs in {tmp})")
    if record:
        fig.record(f"nodekeeper beside node-problem-detector {args.npd_version}",
                   f"NPD_SRC=<checkout of {args.npd_version}> scripts/bench/npd-side-by-side.sh {args.rate}",
                   f"idle {idle_s} s, flood {flood_s} s at {args.rate} lines/s, both at once on the same /dev/kmsg",
                   "release agent; NPD built from source with Debian's Go 1.19 (CGO off, no journald); both with "
                   "NPD's kernel-monitor.json of that tag")


if __name__ == "__main__":
    main()
