#!/usr/bin/env bash
# make bench-fscore: fs-core model throughput and how fast campaigns find the stale-mapping
# bug. Prints three figures:
#   1. simulated 4 KiB buffered writes per second of CPU time (target >= 100,000; the wall-clock
#      figure is printed too, and drops when other jobs share the machine), fs-core/benches;
#   2. campaign runs per second with every fix on (each run: workload, schedule, oracle);
#   3. time to the first finding with --no-iomap-valid, median over 20 campaigns whose first
#      seeds are spread apart (and the median number of runs it took).
set -euo pipefail
cd "$(dirname "$0")/.."
CM=target/release/crashmonkey
CAMPAIGN_RUNS=${CAMPAIGN_RUNS:-20000}
FINDING_SEEDS=${FINDING_SEEDS:-20}

cargo build --release -q -p crashmonkey

field() { grep -o "\"$1\": *[0-9.a-z]*" | head -1 | sed 's/.*: *//'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "== 1. simulated 4 KiB buffered writes"
cargo bench -q -p fs-core --bench writes 2>/dev/null | tee /tmp/bench-fscore-writes.$$
writes=$(awk '/^buffered_4k_writes_per_second/ { print $2 }' /tmp/bench-fscore-writes.$$)
writes_wall=$(awk '/^buffered_4k_writes_per_wall_second/ { print $2 }' /tmp/bench-fscore-writes.$$)
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

echo
echo "== summary"
printf "simulated 4 KiB buffered writes/s : %s per CPU-second (target >= 100000); %s per wall-second\n" "$writes" "$writes_wall"
printf "campaign runs/s (defaults)        : %s\n" "$rps"
printf "time to first finding, median     : %s s (%s runs), --no-iomap-valid, %s campaigns\n" "$med_s" "$med_r" "$FINDING_SEEDS"
