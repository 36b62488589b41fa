#!/usr/bin/env bash
# Log matching speed: node-problem-detector's kernel and read-only rules over a
# realistic kernel-log corpus, through `nodekeeper-agent test-rules`, side by
# side with `grep -E -f` on the same patterns and corpus, in one run.
# Prints one line per figure and appends a dated section to BENCHMARKS.md.
#   scripts/bench/log-match.sh [LINES]   (default 5,000,000)
#   NO_RECORD=1 to print only.
set -euo pipefail
cd "$(dirname "$0")/../.."
lines=${1:-5000000}
cargo build --release --quiet -p nodekeeper-agent
npd=tests/fixtures/npd/config
rules=("$npd/kernel-monitor.json" "$npd/readonly-monitor.json")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 scripts/bench/gen_kernel_corpus.py "$tmp/corpus.log" "$lines" 1
# The same patterns for grep: RE2's \d is not ERE, the rest is.
python3 - "${rules[@]}" >"$tmp/patterns.txt" <<'PY'
import json, sys
for f in sys.argv[1:]:
    for r in json.load(open(f))["rules"]:
        print(r["pattern"].replace("\\d", "[0-9]"))
PY

best() { sort -n | head -1; }
nk_times=()
for _ in 1 2 3; do
  s=$(date +%s.%N)
  target/release/nodekeeper-agent test-rules --rules "${rules[@]}" --input "$tmp/corpus.log" -o json >"$tmp/nk.json" 2>"$tmp/nk.err"
  e=$(date +%s.%N)
  nk_times+=("$(echo "$e - $s" | bc -l)")
done
grep_times=()
for _ in 1 2 3; do
  s=$(date +%s.%N)
  LC_ALL=C grep -E -c -f "$tmp/patterns.txt" "$tmp/corpus.log" >"$tmp/grep.count" || true
  e=$(date +%s.%N)
  grep_times+=("$(echo "$e - $s" | bc -l)")
done
nk=$(printf '%s\n' "${nk_times[@]}" | best)
gr=$(printf '%s\n' "${grep_times[@]}" | best)
matches=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["matches"]))' "$tmp/nk.json")
inner=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("{:,.0f}".format(d["linesPerSecond"]))' "$tmp/nk.json")
figs=(
  "corpus: $lines lines, $(du -m "$tmp/corpus.log" | cut -f1) MiB, $(wc -l <"$tmp/patterns.txt") patterns (kernel-monitor.json + readonly-monitor.json)"
  "nodekeeper test-rules: $(python3 -c "print(f'{$lines / $nk:,.0f}')") lines/s (whole command incl. reading the file, best of 3: $nk s); matching loop alone $inner lines/s; $matches matches"
  "grep -E -f (LC_ALL=C): $(python3 -c "print(f'{$lines / $gr:,.0f}')") lines/s (best of 3: $gr s); $(cat "$tmp/grep.count") matching lines"
  "speed-up over grep: $(python3 -c "print(f'{$gr / $nk:.1f}')")x"
)
printf '%s\n' "${figs[@]}"
if [ "${NO_RECORD:-}" != 1 ]; then
  {
    echo
    echo "### log-match — $(date +%F) (commit $(git rev-parse --short HEAD))"
    echo
    echo "Command: \`scripts/bench/log-match.sh $lines\`  "
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB memory; one core used by each program"
    echo
    printf -- '- %s\n' "${figs[@]}"
  } >>BENCHMARKS.md
fi
