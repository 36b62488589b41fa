#!/usr/bin/env bash
# The remedy storm drill with N hollow nodes (default 10,000): 30 % raise a
# correlated fault (one no local step heals) within a minute under a
# RemedyRule with maxConcurrent 2 %, a DisruptionBudget of 5 % and a breaker
# at 10 % in 5 minutes. Checks that no more than the budget is ever
# remediating, that the breaker opens with one FleetIncident, and that after
# the fault is fixed and the breaker reset the rule heals nodes again; then a
# normal run (1 % raise a fault of their own within a minute) for the time to
# heal. Prints one line per figure and appends a dated section to
# BENCHMARKS.md; exits non-zero when a check fails.
# Usage: scripts/bench/remedy-storm.sh [N]
#   REMEDY_SECONDS (default 2)   how long a simulated remedy step takes
#   NO_RECORD=1                  print only, do not touch BENCHMARKS.md
#   PROFILE=release|debug        build profile (default release)
#   TLS=0                        an insecure hub (plaintext, no identities)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/build-bins.sh
exec python3 scripts/bench/remedy_storm.py --bin "target/$profile" --count "${1:-10000}"
