#!/usr/bin/env bash
# nodekeeper's agent beside node-problem-detector on the same rules and the
# same kernel-log lines: both run at once, both read the real /dev/kmsg,
# NPD with its own kernel-monitor.json and the agent with the same file;
# idle RSS (with helpers), idle CPU and wake-ups, then a flood of RATE
# lines/s: CPU, disk writes, and what each detected (problem_counter per
# reason, before and after the flood). Appends a dated section to
# BENCHMARKS.md.
#   NPD_SRC=DIR scripts/bench/npd-side-by-side.sh [RATE]
# NPD_SRC is a checkout of node-problem-detector at the tag to compare with
# (v0.8.12 was measured; its vendor/ directory holds every dependency); the
# script builds it with Debian's Go (installing golang-1.19-go when missing),
# without journald (CGO off), as NPD's Makefile does with ENABLE_JOURNALD=0.
# NPD_BIN=FILE uses a built binary instead (then NPD_CONFIG names the rule file).
#   IDLE_SECONDS (default 60), FLOOD_SECONDS (default 30), NO_RECORD=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p nodekeeper-agent
if [ -z "${NPD_BIN:-}" ]; then
  src=${NPD_SRC:?set NPD_SRC to a node-problem-detector checkout (or NPD_BIN and NPD_CONFIG)}
  go=$(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$go" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-1.19-go
    go=$(ls -d /usr/lib/go-1.*/bin/go | sort -V | tail -1)
  fi
  out=target/npd/node-problem-detector
  mkdir -p target/npd
  (cd "$src" && GOFLAGS=-mod=vendor CGO_ENABLED=0 GOCACHE="$PWD/../.npd-gocache" "$go" build -o "$OLDPWD/$out" ./cmd/nodeproblemdetector)
  NPD_BIN=$out
  NPD_CONFIG=${NPD_CONFIG:-$src/config/kernel-monitor.json}
  NPD_VERSION=${NPD_VERSION:-$(git -C "$src" describe --tags 2>/dev/null || echo unknown)}
fi
exec python3 scripts/bench/npd_side_by_side.py --bin target/release --npd "$NPD_BIN" \
  --rules "${NPD_CONFIG:?NPD_CONFIG: the kernel-monitor.json both read}" --npd-version "${NPD_VERSION:-unknown}" \
  --rate "${1:-5000}"
