"""Driver of scripts/bench/converge-drift.sh (see there)."""
import argparse
import hashlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time

from benchlib import CLK_TCK, Figures, kill_all, free_port, http, proc_cpu_ticks, wait


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def must(what, timeout, cond):
    dt, v = wait(what, timeout, 0.1, cond)
    if dt is None:
        raise SystemExit(f"timed out waiting for {what}")
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    args = ap.parse_args()
    mib = int(os.environ.get("BINARY_MIB", "256"))
    nfiles = int(os.environ.get("ARCHIVE_FILES", "2000"))
    nconf = int(os.environ.get("CONFIG_FILES", "50"))
    sampled = int(os.environ.get("SECONDS_SAMPLED", "30"))
    record = os.environ.get("NO_RECORD") != "1"
    tmp = tempfile.mkdtemp(prefix="nk-converge-drift-")
    www = os.path.join(tmp, "www")
    os.makedirs(www)
    binary = os.path.join(www, "big-binary")
    with open(binary, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    bin_sha = hashlib.sha256(open(binary, "rb").read()).hexdigest()
    tgz = os.path.join(www, "tree.tar.gz")
    with tarfile.open(tgz, "w:gz") as t:
        for i in range(nfiles):
            data = os.urandom(4096)
            ti = tarfile.TarInfo(f"tree/d{i % 50}/f{i}")
            ti.size = len(data)
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
    tgz_sha = hashlib.sha256(open(tgz, "rb").read()).hexdigest()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=www))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    fport = srv.server_address[1]
    grpc, hport, mport = free_port(), free_port(), free_port()
    hub_cfg = os.path.join(tmp, "hub.yaml")
    with open(hub_cfg, "w") as f:
        f.write(f'listen: {{grpc: "127.0.0.1:{grpc}", http: "127.0.0.1:{hport}"}}\nstateDir: {tmp}/hub\nlogLevel: warn\n')
    agent_cfg = os.path.join(tmp, "agent.yaml")
    with open(agent_cfg, "w") as f:
        f.write(f"nodeName: bench-node\nhub: {{address: \"http://127.0.0.1:{grpc}\", insecure: true}}\nstateDir: {tmp}/agent\n"
                f"socket: {tmp}/agent.sock\nmetrics: {{listen: \"127.0.0.1:{mport}\"}}\n"
                "converge: {intervalSeconds: 1}\ndetectors: {defaultRules: false}\nlogLevel: warn\n")
    procs = []
    fig = Figures()

    try:
        hub = subprocess.Popen([f"{args.bin}/nodekeeper-hub", "--config", hub_cfg],
                               stdout=open(os.path.join(tmp, "hub.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(hub)
        agent = subprocess.Popen([f"{args.bin}/nodekeeper-agent", "--config", agent_cfg],
                                 stdout=open(os.path.join(tmp, "agent.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(agent)
        hub_url = f"http://127.0.0.1:{hport}"
        must("hub", 30, lambda: _ok(hub_url + "/healthz"))
        files = "".join(
            f"  - {{path: {tmp}/etc/c{i}.conf, template: \"node={{{{ node.name }}}} i={i} v={{{{ component.version }}}}\\n\"}}\n"
            for i in range(nconf))
        doc = ("apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: big}\nspec:\n  version: \"1\"\n"
               f"  artifact: {{file: {{url: \"http://127.0.0.1:{fport}/big-binary\", sha256: \"{bin_sha}\", path: {tmp}/bin/big}}}}\n"
               f"  files:\n{files}"
               "---\napiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: tree}\nspec:\n  version: \"1\"\n"
               f"  artifact: {{archive: {{url: \"http://127.0.0.1:{fport}/tree.tar.gz\", sha256: \"{tgz_sha}\", "
               f"stripComponents: 1, installDir: {tmp}/opt/tree}}}}\n")
        t = time.monotonic()
        http(hub_url + "/v1/apply", "POST", doc)

        def done():
            try:
                n = json.loads(http(f"{hub_url}/v1/nodes/bench-node"))
            except Exception:
                return None
            cs = n.get("status", {}).get("components", [])
            return len(cs) == 2 and all(c.get("phase") == "Done" for c in cs)
        must("both components Done", 300, done)
        fig("install: apply to both components Done",
            f"{time.monotonic() - t:.2f}", f"s ({mib} MiB binary downloaded and verified, {nfiles}-file archive, {nconf} files)")
        time.sleep(3)  # let the stat cache trust every file (older than its margin)
        m0, c0, w0 = http(f"http://127.0.0.1:{mport}/metrics"), proc_cpu_ticks(agent.pid), time.monotonic()
        time.sleep(sampled)
        m1, c1, w1 = http(f"http://127.0.0.1:{mport}/metrics"), proc_cpu_ticks(agent.pid), time.monotonic()
        passes = metric(m1, "nodekeeper_agent_converge_reconciles_total") - metric(m0, "nodekeeper_agent_converge_reconciles_total")
        secs = (metric(m1, "nodekeeper_agent_converge_reconcile_seconds_total")
                - metric(m0, "nodekeeper_agent_converge_reconcile_seconds_total"))
        cpu = (c1 - c0) / CLK_TCK
        fig("steady: reconcile passes", f"{passes:.0f}", f"in {w1 - w0:.0f} s")
        fig("steady: wall time per pass", f"{secs / max(passes, 1) * 1000:.2f}",
            f"ms ({nfiles} archive files + {nconf} config files + {mib} MiB binary checked)")
        fig("steady: agent CPU", f"{cpu / (w1 - w0) * 100:.2f}", "% of one core at one pass per second")
        t = time.monotonic()
        hashlib.sha256(open(binary, "rb").read()).hexdigest()
        fig("reference: hashing the binary once (python hashlib)", f"{(time.monotonic() - t) * 1000:.0f}",
            "ms — what every pass would cost without the stat cache")
        # A drifted binary is noticed and restored at the next pass.
        with open(f"{tmp}/bin/big", "r+b") as f:
            f.seek(12345)
            f.write(b"tampered")
        t = time.monotonic()

        def restored():
            return hashlib.sha256(open(f"{tmp}/bin/big", "rb").read()).hexdigest() == bin_sha
        must("binary restored", 60, restored)
        fig("drift: tampered binary restored after", f"{time.monotonic() - t:.2f}", "s")
    finally:
        kill_all(procs)
        srv.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    if record:
        fig.record("converge-drift", "scripts/bench/converge-drift.sh",
                   f"BINARY_MIB={mib}, ARCHIVE_FILES={nfiles}, CONFIG_FILES={nconf}, SECONDS_SAMPLED={sampled}",
                   "release agent and hub on the same machine")


def _ok(url):
    try:
        http(url)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
