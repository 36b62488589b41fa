#!/usr/bin/env bash
# Fuzzes every parser of outside input with libFuzzer on the stable
# toolchain (SanitizerCoverage through stable -C flags; no ASan, which needs
# nightly: Rust code is memory-safe, the crashes looked for are panics,
# overflows and hangs).
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target for SECONDS (default 10)
#   RUNS=10000000 scripts/fuzz.sh 0 ...     a fixed number of executions instead
#   FUZZ_PROFILE=smoke                      a quicker build (fuzz/Cargo.toml; test.sh uses it)
# Corpora live in fuzz/corpus/<target> (seeded from tests/fixtures); crashes
# are written to fuzz/artifacts/<target>/ and make this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(link_message permit_request resource_document npd_rules kmsg_record journal_entry filelog_translator)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target/fuzz}
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
profile=${FUZZ_PROFILE:-release}
(cd fuzz && cargo build --profile "$profile" --quiet --bins --target "$host")
bin=$CARGO_TARGET_DIR/$host/$profile
scripts/fuzz-seed.sh
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  if [ -n "${RUNS:-}" ]; then
    limit=(-runs="$RUNS")
  else
    limit=(-max_total_time="$secs")
  fi
  echo "== fuzz $t ${limit[*]}"
  if ! "$bin/$t" "${limit[@]}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 "fuzz/corpus/$t" 2>"fuzz/artifacts/$t/last-run.log"; then
    echo "!! $t found a crash: see fuzz/artifacts/$t/ and its last-run.log" >&2
    tail -40 "fuzz/artifacts/$t/last-run.log" >&2
    status=1
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs" "fuzz/artifacts/$t/last-run.log" || true
done
exit $status
