"""Drives the hub-scale benchmark: see hub-scale.sh. Standard library only."""

import json
import os
import subprocess
import tempfile
import time

from benchlib import bench_args, CLK_TCK, BenchHub, Figures, keep_logs, free_port, http, proc_cpu_ticks, proc_mem, wait

HUB = None  # the BenchHub


def jget(url):
    return json.loads(http(url))


def metric(name):
    return HUB.metric(name + " ")


_conn = []


def summary():
    # One kept-alive connection: polling every 10 ms must not spend the CPU
    # the hub and the hollow agents share (a new connection, and with TLS a
    # new handshake, per poll did).
    try:
        if not _conn:
            _conn.append(HUB.connection())
        c = _conn[0]
        c.request("GET", "/v1/fleet/summary", headers=HUB.headers())
        r = c.getresponse()
        body = r.read()
        return json.loads(body) if r.status == 200 else None
    except Exception:
        _conn.clear()
        return None


def main():
    args = bench_args()
    n = args.count
    steady = int(os.environ.get("STEADY_SECONDS", "30"))
    burst = int(os.environ.get("BURST_PER_AGENT", "10"))
    record = os.environ.get("NO_RECORD") != "1"
    tmp = tempfile.mkdtemp(prefix="nk-hub-scale-")
    global HUB
    HUB = bench_hub = BenchHub(args.bin, tmp)
    tls = bench_hub.tls
    cport = free_port()
    ctl = f"http://127.0.0.1:{cport}"
    procs = []
    start_hub = bench_hub.start

    fig = Figures()

    try:
        hub = start_hub()
        procs.append(hub)
        t0 = time.monotonic()
        hollow = subprocess.Popen(
            [f"{args.bin}/nodekeeper-agent", "hollow", "--count", str(n), *bench_hub.hollow_args(),
             "--control", f"127.0.0.1:{cport}", "--seed", "1", "--component-seconds", "0"],
            stdout=open(os.path.join(tmp, "hollow.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(hollow)
        _, s = wait("all registered and Ready", 300, 0.05,
                    lambda: (lambda s: s if s and s["nodes"]["ready"] >= n else None)(summary()))
        fig("register: all Ready after", f"{time.monotonic() - t0:.2f}", "s")

        # Steady state at the default 10 s heartbeats.
        time.sleep(5)
        c0, w0 = proc_cpu_ticks(hub.pid), time.monotonic()
        time.sleep(steady)
        c1, w1 = proc_cpu_ticks(hub.pid), time.monotonic()
        mem = proc_mem(hub.pid)
        fig("steady: hub CPU", f"{(c1 - c0) / CLK_TCK / (w1 - w0) * 100:.1f}", f"% of one core over {steady}s")
        fig("steady: hub RSS", f"{mem['VmRSS'] / 2**20:.0f}", "MiB")
        hmem = proc_mem(hollow.pid)
        fig("hollow: RSS per agent", f"{hmem['VmRSS'] / n / 1024:.1f}", f"KiB ({hmem['VmRSS'] / 2**20:.0f} MiB for {n})")

        # Fan-out: one AgentProfile selecting every node; the first apply after
        # registration, then three changes of it (median).
        def fan_out(level):
            rev0 = summary()["revision"]
            profile = ("apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: bench-fanout}\n"
                       f"spec: {{logLevel: {level}, heartbeatSeconds: 10, labels: {{bench: fanout}}}}\n")
            since_ms = int(time.time() * 1000)
            cpu0 = proc_cpu_ticks(hub.pid), proc_cpu_ticks(hollow.pid)
            t = time.monotonic()
            bench_hub.request("/v1/apply", "POST", profile)
            answered = time.monotonic() - t
            dt, _ = wait("fan-out inSync", 120, 0.01,
                         lambda: (lambda s: s if s and s["nodes"]["inSync"] >= n and s["revision"] >= rev0 + n else None)(
                             summary()))
            total = time.monotonic() - t if dt is not None else None
            cpu = tuple((b - a) / CLK_TCK for a, b in zip(cpu0, (proc_cpu_ticks(hub.pid), proc_cpu_ticks(hollow.pid))))
            lat = jget(f"{ctl}/latency?sinceMs={since_ms}&revision={rev0 + 1}")
            return answered, total, lat, cpu

        answered, total, lat, first_cpu = fan_out("warn")
        fig("fan-out: apply request answered after", f"{answered * 1000:.0f}", "ms")
        if total is not None:
            fig("fan-out: apply to all inSync (first apply)", f"{total:.3f}", "s")
        if lat["count"]:
            fig("fan-out: per-node apply latency (first apply)",
                f"p50 {lat['p50Ms']:.0f} ms, p99 {lat['p99Ms']:.0f} ms, max {lat['maxMs']:.0f} ms", f"({lat['count']} nodes)")
        runs = [fan_out(level) for level in ("info", "error", "debug")]
        totals = sorted(r[1] for r in runs if r[1] is not None)
        if totals:
            fig("fan-out: apply to all inSync (3 later applies)",
                f"median {totals[len(totals) // 2]:.3f} s, min {totals[0]:.3f} s, max {totals[-1]:.3f}", "s")
        # The CPU both processes spent from the apply to all inSync (the two
        # share this machine's cores: what bounds the figures above).
        cpus = [first_cpu] + [r[3] for r in runs]
        fig("fan-out: CPU per apply (4 applies)",
            "hub " + ", ".join(f"{c[0]:.2f}" for c in cpus) + " s; hollow agents " + ", ".join(f"{c[1]:.2f}" for c in cpus),
            "s")

        # A Component (kubelet-like: a package, three templated files, a unit,
        # a health check) selecting every node: its first apply and a version
        # change, to all inSync; then the Component's status (counts over
        # every node) as an operator's GET.
        def component(version):
            rev0 = summary()["revision"]
            tmpl = "".join(f"line{i}: {{{{ params.p{i % 4} }}}} on {{{{ node.name }}}}\\n" for i in range(30))
            doc = ("apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: bench-all}\nspec: {selector: {}}\n---\n"
                   "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: bench-kubelet}\nspec:\n"
                   f"  version: \"{version}\"\n"
                   "  updateStrategy: {type: AllAtOnce}\n"
                   f"  artifact: {{deb: {{url: \"http://repo.invalid/kubelet_{version}_amd64.deb\", sha256: \"{'a' * 64}\"}}}}\n"
                   "  params: {p0: a, p1: b, p2: c, p3: d}\n"
                   "  nodeSetParams: [{nodeSet: bench-all, params: {p0: z}}]\n"
                   "  files:\n"
                   + "".join(f"  - {{path: /etc/kubernetes/f{i}.conf, template: \"{tmpl}\"}}\n" for i in range(3))
                   + "  service: {unit: kubelet.service}\n"
                   "  health: {http: \"http://127.0.0.1:10248/healthz\", gracePeriodSeconds: 60}\n")
            t = time.monotonic()
            bench_hub.request("/v1/apply", "POST", doc)
            dt, _ = wait("component inSync", 120, 0.01,
                         lambda: (lambda s: s if s and s["nodes"]["inSync"] >= n and s["revision"] >= rev0 + n else None)(
                             summary()))
            return time.monotonic() - t if dt is not None else None

        h0, a0 = proc_cpu_ticks(hub.pid), proc_cpu_ticks(hollow.pid)
        first = component("1.29.4")
        h1, a1 = proc_cpu_ticks(hub.pid), proc_cpu_ticks(hollow.pid)
        later = component("1.29.5")
        if first is not None and later is not None:
            fig("component: apply to all inSync", f"first {first:.3f} s, version change {later:.3f}", "s")
            fig("component: CPU during the first apply",
                f"hub {(h1 - h0) / CLK_TCK:.2f} s, hollow agents {(a1 - a0) / CLK_TCK:.2f}", "s")
        t = time.monotonic()
        st = json.loads(bench_hub.request("/v1/components/bench-kubelet"))["status"]
        fig("component: GET with status over every node", f"{(time.monotonic() - t) * 1000:.0f}",
            f"ms (selectedNodes {st.get('selectedNodes', 0)})")

        # Report ingest: every hollow agent sends `burst` condition changes at once.
        r0 = metric("nodekeeper_hub_reports_received_total")
        total = n * burst
        t = time.monotonic()
        http(f"{ctl}/burst?perAgent={burst}", "POST")
        dt, _ = wait("burst persisted", 300, 0.01,
                     lambda: metric("nodekeeper_hub_reports_received_total") - r0 >= total)
        dt_ack, _ = wait("burst acknowledged", 300, 0.02, lambda: jget(f"{ctl}/stats")["outboxPending"] == 0)
        el = time.monotonic() - t
        if dt is not None:
            fig("ingest: burst of", f"{total} reports persisted and acknowledged in {el:.2f} s = {total / el:,.0f}",
                "reports/s")
        dups = metric("nodekeeper_hub_reports_duplicate_total")
        fig("ingest: duplicates ignored", f"{dups:.0f}")

        # Restart: SIGKILL the hub and start it on the same store.
        hub.kill()
        hub.wait()
        procs.remove(hub)
        time.sleep(1)
        t = time.monotonic()
        hub = start_hub()
        procs.append(hub)
        samples = []
        def back():
            s = summary()
            samples.append((time.monotonic(), metric("nodekeeper_hub_sessions_opened_total")))
            ok = s and s["nodes"]["ready"] >= n and s["nodes"]["inSync"] >= n and s["nodes"]["connected"] >= n
            return s if ok else None
        dt, _ = wait("all back after restart", 300, 0.1, back)
        if dt is not None:
            fig("restart: SIGKILL to all Ready and inSync", f"{time.monotonic() - t:.2f}", "s")
        peak = 0.0
        for (ta, a), (tb, b) in zip(samples, samples[5:]):
            if tb > ta:
                peak = max(peak, (b - a) / (tb - ta))
        fig("restart: peak session accept rate", f"{peak:,.0f}", "sessions/s (0.5 s window)")
        size = sum(os.path.getsize(os.path.join(tmp, "state", f)) for f in os.listdir(os.path.join(tmp, "state")))
        fig("store: size on disk", f"{size / 2**20:.1f}", f"MiB ({size / n / 1024:.1f} KiB per node)")
        mem = proc_mem(hub.pid)
        fig("restart: hub RSS after reconnect", f"{mem['VmRSS'] / 2**20:.0f}", "MiB")
    finally:
        keep_logs(procs, tmp)

    if record:
        fig.record(f"hub-scale, N = {n}, TLS {'on' if tls else 'off'}",
                   f"{'' if tls else 'TLS=0 '}scripts/bench/hub-scale.sh {n}",
                   f"STEADY_SECONDS={steady}, BURST_PER_AGENT={burst}",
                   "hub and hollow agents on the same machine; " + (
                       "TLS 1.3 with client certificates, hollow agents joined with a token" if tls else
                       "insecure: true (plaintext, no identities)"))


if __name__ == "__main__":
    main()
