#!/usr/bin/env bash
# nkctl listing a large fleet: a release hub with N hollow agents (default
# 10,000), then `nkctl get nodes` several times: time to the first row, to
# the whole table, and nkctl's peak memory. Appends a dated section to
# BENCHMARKS.md. Usage: scripts/bench/nkctl-list.sh [N]
#   RUNS (default 5), NO_RECORD=1 to print only.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p nodekeeper-hub -p nodekeeper-agent -p nkctl
exec python3 scripts/bench/nkctl_list.py --bin target/release --count "${1:-10000}"
