#!/usr/bin/env bash
# What a campaign folder costs a race campaign: the same campaign with and without --out,
# REPS times each, interleaved (so that other load on the machine falls on both alike), and
# the medians of wall and user CPU seconds. A benchmark, not a test: it prints, it does not
# judge. Env: RUNS (default 20000), REPS (default 7), SEED (1).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-20000}
REPS=${REPS:-7}
SEED=${SEED:-1}
cargo build --release -q -p crashmonkey
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CM=$(release_dir)/crashmonkey
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Exit 1 means failures found, which this campaign is meant to find.
timed() {
    local label=$1 rc=0
    shift
    /usr/bin/time -f "$label %e %U" -a -o "$WORK/times" "$CM" race --seed "$SEED" \
        --runs "$RUNS" --no-iomap-valid --json "$@" > /dev/null || rc=$?
    [[ $rc == 0 || $rc == 1 ]]
}
echo "bench-campaign-folder: $RUNS runs from seed $SEED, --no-iomap-valid, $REPS times each"
for _ in $(seq "$REPS"); do
    rm -rf "$WORK/camp" "$WORK/plain"
    mkdir "$WORK/plain"
    (cd "$WORK/plain" && timed plain)
    timed out --out "$WORK/camp"
done
python3 - "$WORK/times" "$RUNS" <<'PY'
import statistics, sys
runs = int(sys.argv[2])
by = {}
for line in open(sys.argv[1]):
    # time(1) also notes the exit status 1 (failures found) on a line of its own.
    if not line.startswith(("plain ", "out ")):
        continue
    label, wall, user = line.split()
    by.setdefault(label, []).append((float(wall), float(user)))
med = {k: (statistics.median(w for w, _ in v), statistics.median(u for _, u in v)) for k, v in by.items()}
for k, (w, u) in med.items():
    print(f"  {k:5}: wall {w:.2f} s ({runs / w:.0f} runs/s), user {u:.2f} s")
(pw, pu), (ow, ou) = med["plain"], med["out"]
print(f"bench-campaign-folder: --out costs {100 * (ow / pw - 1):+.1f}% wall, {100 * (ou / pu - 1):+.1f}% user CPU (medians)")
PY
