"""Drives the remedy storm drill: see remedy-storm.sh. Standard library only."""

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import bench_args, CLK_TCK, BenchHub, Figures, keep_logs, free_port, http, proc_cpu_ticks, wait

RULE = "storm"
FAULT = "HollowFault"


def ts(s):
    """Unix seconds of an RFC 3339 time the hub wrote (UTC, 'Z')."""
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))]


def most_overlapping(jobs):
    """Most steps (each under a permit) at one moment, from the jobs' step records."""
    edges = []
    for j in jobs:
        for s in j.get("steps", []):
            if s.get("startTime") and s.get("endTime"):
                edges += [(ts(s["startTime"]), 1), (ts(s["endTime"]), -1)]
    edges.sort()  # an end before a start at the same instant
    cur = most = 0
    for _, d in edges:
        cur += d
        most = max(most, cur)
    return most


def main():
    args = bench_args()
    n = args.count
    step_s = float(os.environ.get("REMEDY_SECONDS", "2"))
    record = os.environ.get("NO_RECORD") != "1"
    storm, normal = math.ceil(n * 0.30), max(1, math.ceil(n * 0.01))
    budget = min(math.floor(n * 0.02), math.floor(n * 0.05))
    threshold = math.floor(n * 0.10)
    tmp = tempfile.mkdtemp(prefix="nk-storm-")
    hub_b = BenchHub(args.bin, tmp)
    cport = free_port()
    ctl = f"http://127.0.0.1:{cport}"
    fig = Figures()
    procs = []
    failed = []

    def check(ok, what):
        print(("ok: " if ok else "FAILED: ") + what, flush=True)
        if not ok:
            failed.append(what)

    get, metric = hub_b.get, hub_b.metric

    def jobs():
        return get(f"/v1/remedies?rule={RULE}")["items"]

    def incidents():
        return [e for e in get("/v1/incidents")["items"] if e.get("source") == f"remedyrule/{RULE}"]

    try:
        hub = hub_b.start()
        procs.append(hub)
        hollow = subprocess.Popen(
            [f"{args.bin}/nodekeeper-agent", "hollow", "--count", str(n), *hub_b.hollow_args(),
             "--control", f"127.0.0.1:{cport}", "--seed", "1", "--component-seconds", "0s",
             "--remedy-seconds", f"{step_s}s"],
            stdout=open(os.path.join(tmp, "hollow.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(hollow)
        wait("all Ready", 900, 0.2, lambda: get("/v1/fleet/summary")["nodes"]["ready"] >= n)
        rev0 = get("/v1/fleet/summary")["revision"]
        hub_b.request("/v1/apply", "POST",
                      "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: fleet}\n"
                      "spec: {nodeSelector: {matchLabels: {hollow: 'true'}}, maxUnavailable: 5%}\n---\n"
                      f"apiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {{name: {RULE}}}\nspec:\n"
                      "  nodeSelector: {matchLabels: {hollow: 'true'}}\n"
                      f"  conditions: [{{type: {FAULT}, status: 'True', forSeconds: 2}}]\n"
                      "  steps: [{action: restartUnit, params: {unit: containerd.service}, verifySeconds: 5}]\n"
                      "  cooldownSeconds: 600\n  maxConcurrent: 2%\n"
                      "  breaker: {threshold: 10%, windowSeconds: 300, cooldownSeconds: 3600}\n")
        wait("the rule on every node", 300, 0.2,
             lambda: (lambda s: s["nodes"]["inSync"] >= n and s["revision"] >= rev0 + n)(get("/v1/fleet/summary")))

        # The storm, with the rule's permits sampled all along.
        samples, most = [0], [0]
        stop = threading.Event()

        def sample():
            conn = hub_b.connection()
            while not stop.is_set():
                try:
                    conn.request("GET", "/v1/permits", headers=hub_b.headers())
                    items = json.loads(conn.getresponse().read())["items"]
                    most[0] = max(most[0], sum(1 for p in items if p["action"] == f"remedy/{RULE}"))
                    samples[0] += 1
                except Exception:
                    conn = hub_b.connection()
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        g0, d0 = metric("nodekeeper_hub_permits_total", 'action="remedy",result="granted"'), \
            metric("nodekeeper_hub_permits_total", 'action="remedy",result="denied"')
        ds0, c0, t0 = metric("nodekeeper_hub_permit_decide_seconds"), proc_cpu_ticks(hub.pid), time.monotonic()
        http(f"{ctl}/raise?condition={FAULT}&count={storm}&spreadSeconds=60&correlated=true", "POST")
        _, rule = wait("the breaker open", 300, 0.1, lambda: (lambda r: r if r["status"].get("breakerOpen") else None)(
            get(f"/v1/remedyrules/{RULE}")))
        check(rule is not None, "the breaker opened")
        wait("every storm job ended", 600, 0.5, lambda: (lambda js: len({j["node"] for j in js}) >= storm and all(
            j["phase"] in ("Succeeded", "Failed", "Denied") for j in js))(jobs()))
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        c1 = proc_cpu_ticks(hub.pid)
        g1, d1 = metric("nodekeeper_hub_permits_total", 'action="remedy",result="granted"'), \
            metric("nodekeeper_hub_permits_total", 'action="remedy",result="denied"')
        ds1 = metric("nodekeeper_hub_permit_decide_seconds")
        js = jobs()
        opened = ts(rule["status"]["breakerOpenedTime"]) if rule else None
        first = min(ts(j["conditionTime"]) for j in js)
        stepped = [j for j in js if j.get("steps")]
        before = [j for j in stepped if opened and ts(j["steps"][0]["startTime"]) <= opened]
        overlap = most_overlapping(js)
        check(most[0] <= budget and overlap <= budget,
              f"never more than the budget remediating: at most {most[0]} permits held in {samples[0]} samples, "
              f"{overlap} steps at once, budget {budget}")
        check(0 < len(stepped) < storm, f"{len(stepped)} of {storm} nodes were granted a step")
        check(len(incidents()) == 1, f"one FleetIncident ({len(incidents())})")
        if opened:
            fig("storm: time from the first condition to the breaker open", f"{opened - first:.1f}",
                f"s ({storm} nodes raising over 60 s; threshold {threshold} nodes in 300 s; "
                f"{rule['status'].get('raisedInWindow')} raised when read)")
        fig("storm: permits granted before the breaker opened", f"{len(before)}",
            f"(budget {budget} at once; {len(stepped)} granted in all, {g1 - g0:.0f} granted and {d1 - d0:.0f} "
            f"refused decisions in the drill)")
        fig("storm: most nodes remediating at once", f"{max(most[0], overlap)}",
            f"(budget {budget}; {samples[0]} samples of /v1/permits, and the jobs' step records)")
        fig("storm: hub CPU for the permit decisions", f"{ds1 - ds0:.3f}",
            f"s deciding {g1 - g0 + d1 - d0:.0f} decisions = {(g1 - g0 + d1 - d0) / max(ds1 - ds0, 1e-9):,.0f} "
            f"decisions/s; the hub process used {(c1 - c0) / CLK_TCK:.1f} s CPU in the {wall:.0f} s drill in all")

        # The cause fixed, the breaker reset: nodes' own faults heal again.
        cleared = json.loads(http(f"{ctl}/clear?condition={FAULT}", "POST"))["cleared"]
        check(cleared == storm, f"the fault cleared on {cleared} nodes")
        hub_b.request(f"/v1/remedyrules/{RULE}/breaker/reset", "POST", "")
        t1 = time.time()
        raised = json.loads(http(f"{ctl}/raise?condition={FAULT}&count={normal}&skip={storm}&spreadSeconds=60",
                                 "POST"))["nodes"]
        want = set(raised)
        _, healed = wait("the normal run healed", 600, 0.5, lambda: (lambda ok: ok if want <= {j["node"] for j in ok}
                                                                     else None)(
            [j for j in jobs() if j["phase"] == "Succeeded" and ts(j["startTime"]) >= t1]))
        check(healed is not None, f"after the reset the rule healed all {normal} nodes of the normal run")
        r = get(f"/v1/remedyrules/{RULE}")
        check(not r["status"].get("breakerOpen"), "the breaker stayed closed in the normal run")
        check(len(incidents()) == 1, "still one FleetIncident")
        if healed:
            heal = [ts(j["endTime"]) - ts(j["conditionTime"]) for j in healed]
            fig("normal run: time to heal (condition True to cleared)",
                f"p50 {pct(heal, 0.5):.1f} s, p99 {pct(heal, 0.99):.1f} s, max {max(heal):.1f} s",
                f"({normal} nodes over 60 s; forSeconds 2, a {step_s:g} s simulated step, verified every second)")
    finally:
        keep_logs(procs, tmp)

    if record and not failed:
        fig.record(f"remedy storm drill, N = {n}, TLS {'on' if hub_b.tls else 'off'}",
                   f"{'' if hub_b.tls else 'TLS=0 '}scripts/bench/remedy-storm.sh {n}",
                   f"REMEDY_SECONDS={step_s:g}; maxConcurrent 2%, DisruptionBudget 5%, breaker 10% in 300 s",
                   "hub and hollow agents on the same machine; hollow agents run the real remedy executor and "
                   "permit client with simulated steps")
    if failed:
        print("drill failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
