"""Drives the rollout benchmark: see rollout.sh. Standard library only."""

import json
import math
import os
import subprocess
import tempfile
import threading
import time

from benchlib import bench_args, CLK_TCK, BenchHub, Figures, keep_logs, free_port, http, proc_cpu_ticks, wait

SETS = 10


def main():
    args = bench_args()
    n = args.count
    change = float(os.environ.get("CHANGE_SECONDS", "2"))
    record = os.environ.get("NO_RECORD") != "1"
    tmp = tempfile.mkdtemp(prefix="nk-rollout-")
    hub_b = BenchHub(args.bin, tmp)
    cport = free_port()
    ctl = f"http://127.0.0.1:{cport}"
    fig = Figures()
    procs = []

    get, metric = hub_b.get, hub_b.metric

    def rollout():
        return get("/v1/components/bench-kubelet")["status"].get("rollout") or {}

    def apply(doc):
        hub_b.request("/v1/apply", "POST", doc)

    def component(version, strategy):
        return ("apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: bench-kubelet}\nspec:\n"
                f"  version: \"{version}\"\n  nodeSelector: {{matchLabels: {{hollow: 'true'}}}}\n"
                f"  files: [{{path: /etc/kubernetes/kubelet.conf, template: \"v{version} {{{{ node.name }}}}\"}}]\n"
                f"{strategy}")

    def wait_complete(what, timeout):
        gen = get("/v1/components/bench-kubelet")["metadata"]["generation"]
        return wait(what, timeout, 0.2,
                    lambda: (lambda r: r if r.get("phase") == "Complete" and r.get("updateRevision") == gen else None)(
                        rollout()))

    try:
        hub = hub_b.start()
        procs.append(hub)
        hollow = subprocess.Popen(
            [f"{args.bin}/nodekeeper-agent", "hollow", "--count", str(n), *hub_b.hollow_args(),
             "--control", f"127.0.0.1:{cport}", "--seed", "1", "--zones", str(SETS),
             "--component-seconds", f"{change}s"],
            stdout=open(os.path.join(tmp, "hollow.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(hollow)
        wait("all Ready", 600, 0.2, lambda: get("/v1/fleet/summary")["nodes"]["ready"] >= n)
        apply("".join(
            f"apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {{name: z{z}}}\n"
            f"spec: {{selector: {{matchLabels: {{zone: z{z}}}}}}}\n---\n" for z in range(SETS)))

        # A first version everywhere at once: every node asks for a permit together.
        g0, c0, t0 = metric("nodekeeper_hub_permits_total", 'result="granted"'), proc_cpu_ticks(hub.pid), time.monotonic()
        apply(component("1.0", "  updateStrategy: {type: AllAtOnce}\n"))
        dt, _ = wait_complete("AllAtOnce complete", 600)
        g1, c1 = metric("nodekeeper_hub_permits_total", 'result="granted"'), proc_cpu_ticks(hub.pid)
        fig("AllAtOnce: every node changed in", f"{time.monotonic() - t0:.1f}",
            f"s ({g1 - g0:.0f} permits granted; {change:.0f} s changes; hub CPU {(c1 - c0) / CLK_TCK:.1f} s)")

        # The rolling update: 10 NodeSets one after another, 10% of each at once.
        per_set = math.ceil(n / SETS)
        batch = math.ceil(per_set * 0.10)
        ideal = SETS * math.ceil(per_set / batch) * change
        strategy = ("  updateStrategy:\n    rollingUpdate:\n"
                    f"      nodeSetOrder: [{', '.join(f'z{z}' for z in range(SETS))}]\n"
                    "      maxUnavailable: 10%\n")
        done_at = {}
        stop = threading.Event()

        def watch_sets():
            while not stop.is_set():
                try:
                    for g in rollout().get("nodeSets", []):
                        if g.get("phase") == "Complete" and g["name"] not in done_at:
                            done_at[g["name"]] = time.monotonic()
                except Exception:
                    pass
                time.sleep(0.2)

        g0 = metric("nodekeeper_hub_permits_total", 'result="granted"')
        d0 = metric("nodekeeper_hub_permits_total", 'result="denied"')
        ds0 = metric("nodekeeper_hub_permit_decide_seconds")
        rs0 = metric("nodekeeper_hub_rollout_seconds")
        c0, t0 = proc_cpu_ticks(hub.pid), time.monotonic()
        apply(component("2.0", strategy))
        watcher = threading.Thread(target=watch_sets, daemon=True)
        watcher.start()
        # Fan-out while it runs: an AgentProfile change to every node, mid-rollout.
        time.sleep(ideal / 3)
        rev0 = get("/v1/fleet/summary")["revision"]
        since_ms = int(time.time() * 1000)
        tf = time.monotonic()
        apply("apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: bench-during}\n"
              "spec: {logLevel: warn, labels: {bench: during}}\n")
        wait("profile reached every node", 300, 0.05,
             lambda: json.loads(http(f"{ctl}/latency?sinceMs={since_ms}&revision={rev0 + 1}"))["count"] >= n)
        fan = time.monotonic() - tf
        lat = json.loads(http(f"{ctl}/latency?sinceMs={since_ms}&revision={rev0 + 1}"))
        dt, _ = wait_complete("rolling update complete", 3600)
        wall = time.monotonic() - t0
        stop.set()
        c1 = proc_cpu_ticks(hub.pid)
        g1 = metric("nodekeeper_hub_permits_total", 'result="granted"')
        d1 = metric("nodekeeper_hub_permits_total", 'result="denied"')
        ds1 = metric("nodekeeper_hub_permit_decide_seconds")
        rs1 = metric("nodekeeper_hub_rollout_seconds")
        grants, denials = g1 - g0, d1 - d0
        fig("rolling update: wall time", f"{wall:.1f}",
            f"s against the ideal {ideal:.0f} s the budget allows ({SETS} NodeSets x {math.ceil(per_set / batch)} batches of {batch} x {change:.0f} s)"
            f" = {wall / ideal * 100:.0f}% of ideal")
        prev = t0
        times = []
        for z in range(SETS):
            t = done_at.get(f"z{z}")
            if t is not None:
                times.append(t - prev)
                prev = t
        if times:
            fig("rolling update: time per NodeSet",
                f"median {sorted(times)[len(times) // 2]:.1f} s, min {min(times):.1f}, max {max(times):.1f}",
                f"s (ideal {math.ceil(per_set / batch) * change:.0f} s)")
        fig("rolling update: hub CPU", f"{(c1 - c0) / CLK_TCK:.1f}",
            f"s in all = {(c1 - c0) / CLK_TCK / n * 1e3:.2f} ms per node (hub process: controller, permits, reports, fan-out)")
        fig("rolling update: controller passes", f"{rs1 - rs0:.2f}",
            f"s wall in passes = {(rs1 - rs0) / n * 1e3:.3f} ms per node")
        fig("rolling update: permit decisions", f"{grants:.0f} granted, {denials:.0f} denied",
            f"in {wall:.0f} s; deciding took {ds1 - ds0:.3f} s = {(grants + denials) / max(ds1 - ds0, 1e-9):,.0f} decisions/s")
        fig("rolling update: fan-out of an AgentProfile mid-rollout",
            f"all {n} nodes in {fan:.2f} s; per node p50 {lat['p50Ms']:.0f} ms, p99 {lat['p99Ms']:.0f} ms", "")
    finally:
        keep_logs(procs, tmp)

    if record:
        fig.record(f"rollout, N = {n}, {SETS} NodeSets, TLS {'on' if hub_b.tls else 'off'}",
                   f"{'' if hub_b.tls else 'TLS=0 '}scripts/bench/rollout.sh {n}",
                   f"CHANGE_SECONDS={change:g}, maxUnavailable 10% per NodeSet, no budget, no soak",
                   "hub and hollow agents on the same machine; hollow agents simulate each change through the "
                   "defender's permits")


if __name__ == "__main__":
    main()
