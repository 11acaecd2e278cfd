#!/usr/bin/env bash
# make bench-fscore: fs-core model throughput, how fast campaigns find the stale-mapping
# bug, and how fast fs campaigns check crash states. Prints:
#   1. simulated 4 KiB buffered writes per second of CPU time (target >= 100,000; the wall-clock
#      figure is printed too, and drops when other jobs share the machine), fs-core/benches,
#      in memory and on a filesystem that persists (the journal's cost);
#   2. race campaign runs per second with every fix on (each run: workload, schedule, oracle);
#   3. time to the first finding with --no-iomap-valid, median over 20 campaigns whose first
#      seeds are spread apart (and the median number of runs it took);
#   4. fs campaign crash states per second (mounted with recovery, fsck'd, judged; target
#      >= 20,000), ace and random workloads, with CPU seconds per state;
#   5. on the same log (the campaign's largest run), states checked per second in process
#      against `crashmonkey check --checker true` (one process per state), side by side
#      (target >= 30x).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CM=$(release_dir)/crashmonkey
CAMPAIGN_RUNS=${CAMPAIGN_RUNS:-20000}
FINDING_SEEDS=${FINDING_SEEDS:-20}
FS_RUNS=${FS_RUNS:-2000}
WORK=$(mktemp -d /tmp/bench-fscore.XXXXXX)
trap 'rm -rf "$WORK"' EXIT INT TERM

cargo build --release -q -p crashmonkey

field() { grep -o "\"$1\": *[0-9.a-z]*" | head -1 | sed 's/.*: *//'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "== 1. simulated 4 KiB buffered writes"
cargo bench -q -p fs-core --bench writes 2>/dev/null | tee /tmp/bench-fscore-writes.$$
writes=$(awk '/^buffered_4k_writes_per_second/ { print $2 }' /tmp/bench-fscore-writes.$$)
writes_wall=$(awk '/^buffered_4k_writes_per_wall_second/ { print $2 }' /tmp/bench-fscore-writes.$$)
writes_persist=$(awk '/^persistent_buffered_4k_writes_per_second/ { print $2 }' /tmp/bench-fscore-writes.$$)
rm -f /tmp/bench-fscore-writes.$$

echo "== 2. campaign throughput ($CAMPAIGN_RUNS runs, defaults)"
json=$("$CM" race --seed 1 --runs "$CAMPAIGN_RUNS" --json --no-bundle)
rps=$(echo "$json" | field runs_per_second | cut -d. -f1)
echo "runs_per_second $rps (failures: $(echo "$json" | field failures))"

echo "== 3. time to first finding with --no-iomap-valid ($FINDING_SEEDS campaigns)"
secs=()
runs=()
for k in $(seq 1 "$FINDING_SEEDS"); do
  seed=$((k * 1000003))
  json=$("$CM" race --seed "$seed" --runs 1000000 --max-failures 1 --no-iomap-valid --json --no-bundle || true)
  s=$(echo "$json" | field seconds)
  r=$(echo "$json" | field runs)
  secs+=("$s")
  runs+=("$r")
  printf "  seed %-9s first finding after %6s runs, %s s\n" "$seed" "$r" "$s"
done
med_s=$(printf "%s\n" "${secs[@]}" | median)
med_r=$(printf "%s\n" "${runs[@]}" | median)

declare -A fs_rate fs_cpu recheck check ratio
for w in ace random; do
  echo "== 4. fs campaign, $w workloads ($FS_RUNS runs, defaults, every core)"
  TIMEFORMAT="%U %S"
  { time "$CM" fs campaign --seed 1 --runs "$FS_RUNS" --workload "$w" --json --no-bundle \
    --save-largest "$WORK/$w" >"$WORK/$w.json" 2>/dev/null; } 2>"$WORK/$w.time"
  states=$(field crash_states <"$WORK/$w.json")
  fs_rate[$w]=$(field states_per_second <"$WORK/$w.json" | cut -d. -f1)
  fs_cpu[$w]=$(awk -v n="$states" '{ printf "%.1f", ($1 + $2) / n * 1e6 }' "$WORK/$w.time")
  echo "$states crash states, ${fs_rate[$w]} states/s, ${fs_cpu[$w]} CPU-µs per state" \
    "(failures: $(field failures <"$WORK/$w.json"))"
  echo "== 5. the largest run's log, in process and with crashmonkey check --checker true"
  recheck[$w]=$(field recheck_states_per_second <"$WORK/$w/run.json" | cut -d. -f1)
  json=$("$CM" check "$WORK/$w/device.log" --base "$WORK/$w/base.img" \
    --checker 'true {image}' --jobs "$(nproc)" --json 2>/dev/null)
  n=$(echo "$json" | field unique)
  s=$(echo "$json" | field seconds)
  check[$w]=$(awk -v n="$n" -v s="$s" 'BEGIN { printf "%.0f", n / s }')
  ratio[$w]=$(awk -v a="${recheck[$w]}" -v b="${check[$w]}" 'BEGIN { printf "%.1f", a / b }')
  echo "$n states: in process ${recheck[$w]}/s, crashmonkey check ${check[$w]}/s: ${ratio[$w]}x"
done

echo
echo "== summary"
printf "simulated 4 KiB buffered writes/s : %s per CPU-second (target >= 100000); %s per wall-second\n" "$writes" "$writes_wall"
printf "  ... on a persistent filesystem   : %s per CPU-second (journal cost: %s x)\n" "$writes_persist" \
  "$(awk -v a="$writes" -v b="$writes_persist" 'BEGIN { printf "%.2f", a / b }')"
printf "campaign runs/s (defaults)        : %s\n" "$rps"
printf "time to first finding, median     : %s s (%s runs), --no-iomap-valid, %s campaigns\n" "$med_s" "$med_r" "$FINDING_SEEDS"
for w in ace random; do
  printf "fs campaign states/s (%-6s)      : %s (target >= 20000), %s CPU-µs per state\n" "$w" "${fs_rate[$w]}" "${fs_cpu[$w]}"
  printf "  same log, in process vs check    : %s vs %s states/s = %sx (target >= 30x)\n" "${recheck[$w]}" "${check[$w]}" "${ratio[$w]}"
done
