#!/usr/bin/env bash
# Hub at scale: a release hub on a fresh store against N hollow agents
# (default 10,000). Prints one line per figure and appends a dated section to
# BENCHMARKS.md. Usage: scripts/bench/hub-scale.sh [N]
#   STEADY_SECONDS (default 30)  length of the steady-state CPU sample
#   BURST_PER_AGENT (default 10) condition changes per agent in the ingest burst
#   NO_RECORD=1                  print only, do not touch BENCHMARKS.md
#   PROFILE=release|debug        build profile (default release)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/build-bins.sh
exec python3 scripts/bench/hub_scale.py --bin "target/$profile" --count "${1:-10000}"
