#!/usr/bin/env bash
# The converge engine's steady-state cost: a release agent keeps a component
# with a large binary (file artifact), an unpacked archive of many files and
# templated config files, reconciling (drift-checking) once a second. Prints
# the agent's CPU per reconcile pass and appends a dated section to
# BENCHMARKS.md. Usage: scripts/bench/converge-drift.sh
#   BINARY_MIB (default 256)      size of the file artifact
#   ARCHIVE_FILES (default 2000)  files in the archive
#   CONFIG_FILES (default 50)     templated files
#   SECONDS_SAMPLED (default 30)  length of the CPU sample
#   NO_RECORD=1                   print only, do not touch BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p nodekeeper-hub -p nodekeeper-agent
exec python3 scripts/bench/converge_drift.py --bin target/release
