#!/usr/bin/env bash
# The agent's footprint with its default configuration (built-in kernel,
# kubelet and containerd rules; standalone): RSS of the agent and every helper
# process it starts, CPU and wake-ups while idle, then CPU and disk writes
# under a kernel-log flood written to the real /dev/kmsg (root; the devkmsg
# rate limit is lifted for the run and restored). Appends a dated section to
# BENCHMARKS.md.
#   scripts/bench/agent-footprint.sh [RATE]   (lines/s, default 5000)
#   IDLE_SECONDS (default 60), FLOOD_SECONDS (default 30), NO_RECORD=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The build the packages ship (profile dist: thin LTO, one codegen unit,
# stripped); resident memory is mostly the binary's own pages.
cargo build --profile dist --quiet -p nodekeeper-agent
exec python3 scripts/bench/agent_footprint.py --bin target/dist --rate "${1:-5000}"
