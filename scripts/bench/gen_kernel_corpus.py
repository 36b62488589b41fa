"""Writes a realistic kernel-log corpus: one message per line as /dev/kmsg
carries them, mostly ordinary lines of a busy Kubernetes node, with a fault
line (node-problem-detector's kernel fixtures) about once per thousand.
Deterministic for a given seed. Usage: gen_kernel_corpus.py OUT LINES [SEED]"""

import os
import random
import sys

ORDINARY = [
    "IPv6: ADDRCONF(NETDEV_CHANGE): veth{h}: link becomes ready",
    "cni0: port {n}(veth{h}) entered blocking state",
    "cni0: port {n}(veth{h}) entered disabled state",
    "cni0: port {n}(veth{h}) entered forwarding state",
    "device veth{h} entered promiscuous mode",
    "device veth{h} left promiscuous mode",
    "eth0: renamed from tmp{h}",
    "audit: type=1400 audit({t}.{ms}:{n}): apparmor=\"STATUS\" operation=\"profile_load\" profile=\"unconfined\" name=\"cri-containerd.apparmor.d\" pid={p} comm=\"apparmor_parser\"",
    "audit: type=1325 audit({t}.{ms}:{n}): table=filter family=2 entries={n} op=xt_replace pid={p} subj=unconfined comm=\"iptables-restor\"",
    "EXT4-fs (nvme0n1p{n}): mounted filesystem with ordered data mode. Opts: (null). Quota mode: none.",
    "overlayfs: upper fs does not support tmpfile.",
    "xfs filesystem being mounted at /var/lib/kubelet/pods/{h}/volumes supports timestamps until 2038",
    "IPVS: rr: TCP 10.96.{n}.{m}:443 - no destination available",
    "nf_conntrack: default automatic helper assignment has been turned off for security reasons",
    "TCP: request_sock_TCP: Possible SYN flooding on port {n}. Sending cookies.  Check SNMP counters.",
    "br_netfilter: module verification failed: signature and/or required key missing - tainting kernel",
    "systemd-journald[{p}]: Received client request to flush runtime journal.",
    "kauditd_printk_skb: {n} callbacks suppressed",
    "mlx5_core 0000:{n}:00.0: mlx5_fw_tracer_handle_traces:734:(pid {p}): FWTracer: Events were lost",
    "nvme nvme{n}: 32/0/0 default/read/poll queues",
    "pci 0000:00:{n}.0: [8086:2030] type 01 class 0x060400",
    "ACPI: \\_SB_.PCI{n}: _OSC: OS now controls [PCIeHotplug PME AER PCIeCapability LTR]",
    "bpfilter: Loaded bpfilter_umh pid {p}",
    "Memory cgroup stats for /kubepods/burstable/pod{h}: anon {p}KB",
    "process '/usr/bin/containerd-shim-runc-v2' started with executable stack",
    "kvm: already loaded the other module",
    "perf: interrupt took too long ({p} > {n}), lowering kernel.perf_event_max_sample_rate to {m}000",
    "docker0: port {n}(veth{h}) entered disabled state",
    "cgroup: fork rejected by pids controller in /kubepods/besteffort/pod{h}",
    "random: crng init done",
]


def main():
    out, lines = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    main_to(out, lines, seed)


def main_to(out, lines, seed):
    rng = random.Random(seed)
    fixtures_dir = os.path.join(os.path.dirname(__file__), "../../tests/fixtures/npd/kernel-log-problems")
    faults = []
    for name in sorted(os.listdir(fixtures_dir)):
        with open(os.path.join(fixtures_dir, name), errors="replace") as f:
            faults.extend(l.rstrip("\n") for l in f if l.strip())
    with open(out, "w") as f:
        for i in range(lines):
            if rng.random() < 0.001:
                f.write(rng.choice(faults))
            else:
                f.write(rng.choice(ORDINARY).format(
                    h=f"{rng.getrandbits(32):08x}", n=rng.randint(1, 64), m=rng.randint(1, 254),
                    p=rng.randint(100, 99999), t=1700000000 + i // 1000, ms=rng.randint(100, 999)))
            f.write("\n")


if __name__ == "__main__":
    main()
