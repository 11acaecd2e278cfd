#!/usr/bin/env bash
# The local simulation of a sharded campaign: SHARDS processes of `crashmonkey race
# --shard K/SHARDS` (KIND=fs: `crashmonkey fs campaign --shard K/SHARDS`, random workloads
# with the planted size-before-data bug) at once, their failing seeds and run counts compared
# with one unsharded campaign, then the shards' campaign folders merged (`crashmonkey findings
# merge`) with the unsharded campaign's folder. Exits 1 if they differ.
# Env: KIND (race or fs; default race), SHARDS (default 3), RUNS (default 20000 for race, 600
# for fs), SEED (1).
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${KIND:-race}
SHARDS=${SHARDS:-3}
SEED=${SEED:-1}
case $KIND in
race) RUNS=${RUNS:-20000} ;;
fs) RUNS=${RUNS:-600} ;;
*)
    echo "campaign-shards: KIND is race or fs, not $KIND" >&2
    exit 2
    ;;
esac
cargo build --release -q -p crashmonkey
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CM=$(release_dir)/crashmonkey
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Exit 1 means failures found, which this campaign is meant to find; 2 is an error.
race() {
    local rc=0
    if [[ $KIND == race ]]; then
        "$CM" race --seed "$SEED" --runs "$RUNS" --no-iomap-valid --json "$@" || rc=$?
    else
        "$CM" fs campaign --seed "$SEED" --runs "$RUNS" --workload random --bug size-before-data \
            --json "$@" || rc=$?
    fi
    [[ $rc == 0 || $rc == 1 ]]
}
what="race, --no-iomap-valid"
[[ $KIND == fs ]] && what="fs campaign, random workloads, --bug size-before-data"
echo "campaign-shards: $RUNS runs from seed $SEED ($what): once whole, then as $SHARDS shards at once"
race --out "$WORK/whole" > "$WORK/whole.json"
pids=()
for k in $(seq 0 $((SHARDS - 1))); do
    race --shard "$k/$SHARDS" --out "$WORK/s$k" > "$WORK/shard-$k.json" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$WORK" "$SHARDS" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
whole = json.load(open(f"{work}/whole.json"))
parts = [json.load(open(f"{work}/shard-{k}.json")) for k in range(n)]
for k, p in enumerate(parts):
    print(f"  shard {p['shard']}: {p['runs']} runs, {p['failures']} failing, {p['runs'] / max(p['seconds'], 1e-9):.0f} runs/s")
print(f"  whole: {whole['runs']} runs, {whole['failures']} failing, {whole['runs'] / max(whole['seconds'], 1e-9):.0f} runs/s")
seeds = sorted(s for p in parts for s in p["failing_seeds"])
listed_all = whole["failures"] == len(whole["failing_seeds"])
ok = (sum(p["runs"] for p in parts) == whole["runs"]
      and sum(p["failures"] for p in parts) == whole["failures"]
      and (not listed_all or seeds == sorted(whole["failing_seeds"])))
print("campaign-shards: " + ("OK: the shards together found what the whole campaign found"
      if ok else "FAIL: the shards differ from the whole campaign"))
sys.exit(0 if ok else 1)
PY
findings() {
    local rc=0
    "$CM" findings "$@" --json || rc=$?
    [[ $rc == 0 || $rc == 1 ]]
}
shard_dirs=()
for k in $(seq 0 $((SHARDS - 1))); do shard_dirs+=("$WORK/s$k"); done
findings merge "$WORK/merged" "${shard_dirs[@]}" > "$WORK/merged-findings.json"
findings "$WORK/whole" > "$WORK/whole-findings.json"
if cmp -s "$WORK/merged-findings.json" "$WORK/whole-findings.json"; then
    echo "campaign-shards: OK: the shards' folders merged hold the whole campaign's findings ($(grep -c '"signature"' "$WORK/whole-findings.json") findings)"
else
    echo "campaign-shards: FAIL: the merged findings differ from the whole campaign's"
    diff "$WORK/merged-findings.json" "$WORK/whole-findings.json" | head -20
    exit 1
fi
