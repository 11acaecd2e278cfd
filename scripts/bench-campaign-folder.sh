#!/usr/bin/env bash
# What a campaign folder costs a campaign: the same campaign with and without --out, REPS
# times each, interleaved (so that other load on the machine falls on both alike), and the
# medians of wall and user CPU seconds. A benchmark, not a test: it prints, it does not
# judge. KIND=race (the default): `race --no-iomap-valid`, RUNS runs (default 20000);
# KIND=fs: `fs campaign --bug $FS_BUG` (default size-before-data), FS_RUNS runs (default
# 400). Env also: REPS (default 7), SEED (1).
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${KIND:-race}
FS_BUG=${FS_BUG:-size-before-data}
if [[ $KIND == fs ]]; then RUNS=${FS_RUNS:-400}; else RUNS=${RUNS:-20000}; fi
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
    local what=(race --no-iomap-valid)
    [[ $KIND == fs ]] && what=(fs campaign --bug "$FS_BUG")
    /usr/bin/time -f "$label %e %U" -a -o "$WORK/times" "$CM" "${what[@]}" --seed "$SEED" \
        --runs "$RUNS" --json "$@" > /dev/null || rc=$?
    [[ $rc == 0 || $rc == 1 ]]
}
if [[ $KIND == fs ]]; then
    echo "bench-campaign-folder: fs campaign, $RUNS runs from seed $SEED, --bug $FS_BUG, $REPS times each"
else
    echo "bench-campaign-folder: race, $RUNS runs from seed $SEED, --no-iomap-valid, $REPS times each"
fi
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
