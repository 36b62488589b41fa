"""Drives the nkctl-list benchmark: see nkctl-list.sh. Standard library only."""

import json
import os
import shutil
import subprocess
import tempfile
import time

from benchlib import bench_args, BenchHub, Figures, kill_all, wait


def one_run(nkctl, hub_args, args):
    """Runs nkctl once: (seconds to the first data row, seconds in all, rows, peak RSS bytes)."""
    t0 = time.monotonic()
    p = subprocess.Popen([nkctl, *hub_args, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    rows = 0
    header = True
    for line in p.stdout:
        if header:
            header = False
            continue
        rows += 1
        if first is None:
            first = time.monotonic() - t0
    _, status, usage = os.wait4(p.pid, 0)
    total = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.read().decode())
    return first, total, rows, usage.ru_maxrss * 1024


def main():
    args = bench_args()
    n = args.count
    runs = int(os.environ.get("RUNS", "5"))
    record = os.environ.get("NO_RECORD") != "1"
    tmp = tempfile.mkdtemp(prefix="nk-nkctl-list-")
    bench_hub = BenchHub(args.bin, tmp)
    procs = []
    fig = Figures()
    try:
        hub = bench_hub.start()
        procs.append(hub)
        hollow = subprocess.Popen(
            [f"{args.bin}/nodekeeper-agent", "hollow", "--count", str(n), *bench_hub.hollow_args()],
            stdout=open(os.path.join(tmp, "hollow.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(hollow)
        wait("all registered", 300, 0.2,
             lambda: json.loads(bench_hub.request("/v1/fleet/summary"))["nodes"]["ready"] >= n)
        time.sleep(3)
        t = time.monotonic()
        body = bench_hub.request("/v1/nodes")
        fig("hub: the whole list in one answer", f"{time.monotonic() - t:.3f} s, {len(body) / 2**20:.1f}", "MiB")
        del body
        nkctl = f"{args.bin}/nkctl"
        for label, extra in (("table", []), ("wide table", ["-o", "wide"])):
            results = [one_run(nkctl, bench_hub.nkctl_args(), ["get", "nodes", *extra]) for _ in range(runs)]
            assert all(r[2] == n for r in results), [r[2] for r in results]
            firsts = sorted(r[0] for r in results)
            totals = sorted(r[1] for r in results)
            rss = max(r[3] for r in results)
            fig(f"nkctl get nodes ({label}): first row", f"median {firsts[runs // 2] * 1000:.0f} ms, max {firsts[-1] * 1000:.0f}", "ms")
            fig(f"nkctl get nodes ({label}): whole table", f"median {totals[runs // 2]:.3f} s, max {totals[-1]:.3f}", "s")
            fig(f"nkctl get nodes ({label}): peak RSS", f"{rss / 2**20:.1f}", "MiB")
        if record:
            tls = bench_hub.tls
            fig.record(f"nkctl get nodes at scale, TLS {'on' if tls else 'off'}",
                       f"{'' if tls else 'TLS=0 '}scripts/bench/nkctl-list.sh", f"N={n}, {runs} runs each, pages of 500",
                       "release build; hub and hollow agents on the same machine; " + (
                           "HTTPS with a token, agents joined over TLS" if tls else "insecure: true"))
    finally:
        kill_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
