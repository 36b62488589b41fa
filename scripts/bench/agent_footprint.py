"""See agent-footprint.sh."""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import CLK_TCK, Figures, wait  # noqa: E402
import gen_kernel_corpus  # noqa: E402


def tree(pid):
    """The process and all its descendants."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def rss_kib(pid, field="VmRSS:"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ticks(pids):
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rfind(")") + 2:].split()
            t += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return t


def switches(pids):
    """Context switches of every thread: each is a wake-up or a preemption."""
    n = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            n += int(line.split()[1])
            except OSError:
                pass
    return n


def io(pids):
    w = sysc = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/io") as f:
                for line in f:
                    k, v = line.split(":")
                    if k == "write_bytes":
                        w += int(v)
                    elif k == "syscw":
                        sysc += int(v)
        except OSError:
            pass
    return w, sysc


def kernel_lines(tmp, rate, seconds):
    """RATE x SECONDS ordinary lines of a busy node with a fault line about
    once per thousand (seed 7), as /dev/kmsg records at level info."""
    corpus = os.path.join(tmp, "corpus.log")
    gen_kernel_corpus.main_to(corpus, rate * seconds, 7)
    with open(corpus) as f:
        return [("<6>" + l.rstrip("\n") + "\n").encode() for l in f]


class DevKmsgOn:
    """Lifts the kernel's /dev/kmsg write rate limit (printk_devkmsg=on) and
    puts the old setting back on exit."""

    def __enter__(self):
        with open("/proc/sys/kernel/printk_devkmsg") as f:
            self.old = f.read().strip()
        with open("/proc/sys/kernel/printk_devkmsg", "w") as f:
            f.write("on\n")
        return self

    def __exit__(self, *exc):
        with open("/proc/sys/kernel/printk_devkmsg", "w") as f:
            f.write(self.old + "\n")


def flood(lines, rate):
    """Writes `lines` to /dev/kmsg at `rate` lines/s in 10 ms steps; returns the seconds it took."""
    kmsg = os.open("/dev/kmsg", os.O_WRONLY)
    per_tick = max(1, rate // 100)
    start = time.monotonic()
    for i in range(0, len(lines), per_tick):
        for l in lines[i:i + per_tick]:
            os.write(kmsg, l)
        pause = start + (i + per_tick) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    os.close(kmsg)
    return time.monotonic() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--rate", type=int, default=5000)
    args = ap.parse_args()
    idle_s = int(os.environ.get("IDLE_SECONDS", "60"))
    flood_s = int(os.environ.get("FLOOD_SECONDS", "30"))
    record = os.environ.get("NO_RECORD") != "1"
    fig = Figures()
    tmp = tempfile.mkdtemp(prefix="nk-footprint-")
    cfg = os.path.join(tmp, "agent.yaml")
    with open(cfg, "w") as f:
        f.write(f"nodeName: footprint\nstateDir: {tmp}/state\nsocket: {tmp}/agent.sock\n"
                "detectors: {defaultRules: true}\n")
    agent = subprocess.Popen([f"{args.bin}/nodekeeper-agent", "--config", cfg],
                             stdout=open(os.path.join(tmp, "agent.log"), "w"), stderr=subprocess.STDOUT)
    try:
        wait("agent socket", 30, 0.1, lambda: os.path.exists(f"{tmp}/agent.sock"))
        # Settle: the lookback of the kernel log is read, the journal opened.
        time.sleep(10)
        pids = tree(agent.pid)
        helpers = sorted(comm(p) for p in pids if p != agent.pid)
        total = sum(rss_kib(p) for p in pids)
        fig("idle: RSS, agent and helpers", f"{total / 1024:.1f}",
            f"MiB (agent {rss_kib(agent.pid) / 1024:.1f} MiB, of it {rss_kib(agent.pid, 'RssFile:') / 1024:.1f} "
            f"file-backed; helpers: {', '.join(helpers) or 'none'})")

        c0, s0, w0, t0 = ticks(pids), switches(pids), io(pids), time.monotonic()
        time.sleep(idle_s)
        pids = tree(agent.pid)
        c1, s1, w1, t1 = ticks(pids), switches(pids), io(pids), time.monotonic()
        dt = t1 - t0
        fig("idle: CPU", f"{(c1 - c0) / CLK_TCK / dt * 100:.3f}", f"% of one core over {idle_s} s")
        fig("idle: wake-ups (context switches, all threads)", f"{(s1 - s0) / dt:.2f}", "per second")
        fig("idle: disk writes", f"{(w1[0] - w0[0]) / 1024:.0f}", f"KiB over {idle_s} s")

        # Flood: ordinary lines of a busy node with a fault line about once
        # per thousand, written at RATE lines/s.
        lines = kernel_lines(tmp, args.rate, flood_s)
        c0, s0, w0, t0 = ticks(pids), switches(pids), io(pids), time.monotonic()
        with DevKmsgOn():
            written = flood(lines, args.rate)
        time.sleep(2)  # the last batch is read and committed
        pids = tree(agent.pid)
        c1, s1, w1, t1 = ticks(pids), switches(pids), io(pids), time.monotonic()
        dt = t1 - t0
        fig("flood: lines written", f"{len(lines)}", f"in {written:.1f} s ({len(lines) / written:.0f} lines/s)")
        fig("flood: CPU", f"{(c1 - c0) / CLK_TCK / dt * 100:.2f}", f"% of one core over {dt:.0f} s")
        fig("flood: disk writes", f"{(w1[0] - w0[0]) / 1024:.0f}",
            f"KiB ({(w1[0] - w0[0]) / 1024 / dt:.1f} KiB/s), {w1[1] - w0[1]} write calls")
        fig("flood: RSS, agent and helpers", f"{sum(rss_kib(p) for p in pids) / 1024:.1f}", "MiB")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    if record:
        fig.record("Agent footprint", f"scripts/bench/agent-footprint.sh {args.rate}",
                   f"idle {idle_s} s, flood {flood_s} s at {args.rate} lines/s",
                   f"{os.path.basename(args.bin.rstrip('/'))} build; default configuration (built-in kernel, kubelet and containerd rules), "
                   "standalone; real /dev/kmsg; the system journal is empty on this machine")


if __name__ == "__main__":
    main()
