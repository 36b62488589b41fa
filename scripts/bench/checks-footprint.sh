#!/usr/bin/env bash
# What the default checks (agent/rules/checks.yaml: kubelet and containerd
# probes, unit restarts, resource and hardware checks) add to the agent: RSS
# and idle CPU of the agent with the built-in rules only, then with the
# built-in rules and checks at work — kubelet's healthz answered by a
# stand-in HTTP server (no kubelet binary here), a real containerd, and the
# unit probes asking a real systemd booted in a container over D-Bus.
# Appends a dated section to BENCHMARKS.md.
#   scripts/bench/checks-footprint.sh     IDLE_SECONDS (default 120), NO_RECORD=1
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v containerd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc; }
cargo build --release --quiet -p nodekeeper-agent
exec python3 scripts/bench/checks_footprint.py --bin target/release
