#!/usr/bin/env bash
# A Component rollout across N hollow nodes (default 10,000) in 10 NodeSets,
# maxUnavailable 10% per NodeSet, 2 s simulated changes through the
# defender's permits. Prints one line per figure and appends a dated section
# to BENCHMARKS.md. Usage: scripts/bench/rollout.sh [N]
#   CHANGE_SECONDS (default 2)   how long a simulated change takes
#   NO_RECORD=1                  print only, do not touch BENCHMARKS.md
#   PROFILE=release|debug        build profile (default release)
#   TLS=0                        an insecure hub (plaintext, no identities)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/build-bins.sh
exec python3 scripts/bench/rollout_bench.py --bin "target/$profile" --count "${1:-10000}"
