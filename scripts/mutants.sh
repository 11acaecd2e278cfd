#!/usr/bin/env bash
# Mutation testing of the modules that decide correctness (`make mutants`): cargo-mutants
# changes one thing at a time in them (a return value, an operator, a condition) and runs the
# owning crate's tests; a mutant the tests do not notice ("missed") is a gap in the tests.
# Results per group go to $MUTANTS_OUT/<group>/ (cargo-mutants' outcomes.json, missed.txt,
# caught.txt, unviable.txt), and a table per source file is printed at the end.
#
# A full run is about 2,150 mutants and takes hours on 2 cores; MUTANTS_SHARD=K/N runs the
# K-th of N round-robin shards of each group (a uniform sample), e.g. MUTANTS_SHARD=0/10.
# MUTANTS_GROUPS picks groups (default: all): crashmonkey nbd-server fs-core.
# MUTANTS_ITERATE=1 retests only what the last run in $MUTANTS_OUT did not catch (after adding
# tests for the missed mutants), by name, into $MUTANTS_OUT/<group>-retest.
#
# Needs cargo-mutants (`cargo install --locked cargo-mutants`; installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${MUTANTS_OUT:-${CARGO_TARGET_DIR:-target}/mutants}
SHARD=${MUTANTS_SHARD:-}
GROUPS_WANTED=${MUTANTS_GROUPS:-crashmonkey nbd-server fs-core}
TEST_TIMEOUT_SECONDS=${MUTANTS_TEST_TIMEOUT_SECONDS:-300}

# A mutant that makes a test loop is killed at the timeout, and the temporary folders of that
# test stay behind (a mutated log writer once left 56 GB of log there): every test of the run
# gets its temporary files under one folder, removed on every exit path.
RUN_TMP=$(mktemp -d "${TMPDIR:-/tmp}/mutants-run.XXXXXX")

# A test killed at the timeout can leave the processes it started running (a mutated
# crashmonkey that loops forever, started by a CLI test: four of them once ran for 36 minutes
# and slowed the rest of the run to a crawl). Every process running a program built by this
# run (they all live under $RUN_TMP) that has outlived the test timeout is killed, every 30
# seconds and when the run ends.
reap() {
    local min_age_seconds=$1 pid exe
    for pid in $(ps -eo pid=,etimes= | awk -v t="$min_age_seconds" '$2 >= t {print $1}'); do
        exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
        if [[ $exe == "$RUN_TMP"/* ]]; then
            echo "mutants: killing $pid ($exe), left running by a test" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}
REAP_INTERVAL_SECONDS=30
# The watcher also ends on its own if this script is killed outright (SIGKILL runs no trap).
(while sleep "$REAP_INTERVAL_SECONDS" && kill -0 "$$" 2>/dev/null; do
    reap "$((TEST_TIMEOUT_SECONDS + 60))"
done) &
REAPER_PID=$!
trap 'pkill -P "$REAPER_PID" 2>/dev/null; kill "$REAPER_PID" 2>/dev/null; reap 0; rm -rf "$RUN_TMP"' EXIT
trap 'exit 130' INT TERM
export TMPDIR=$RUN_TMP

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants: installing cargo-mutants"
    cargo install --locked cargo-mutants
fi

# group -> files to mutate and the tests that judge them (each crate's own, the fast ones that
# exercise these modules; the slow interop and kernel tests add nothing here).
run_group() {
    local group=$1
    local -a files tests
    case $group in
    crashmonkey)
        files=(crashmonkey/src/history.rs crashmonkey/src/states.rs crashmonkey/src/overlay.rs)
        tests=(--lib --test=crash_states --test=crash_model --test=hostile_logs --test=dm_log_writes
            --test=dmlog_bad_input --test=check_faults --test=image_reflink)
        ;;
    nbd-server)
        files=('nbd-server/src/disk/**/*.rs' 'nbd-server/src/log/**/*.rs')
        tests=(--lib --test=log_format --test=reliability --test=powercut)
        ;;
    fs-core)
        files=(fs-core/src/iomap.rs fs-core/src/buffered_io.rs fs-core/src/writeback.rs
            fs-core/src/extent.rs fs-core/src/direct_io.rs)
        tests=(--lib --tests)
        ;;
    *)
        echo "mutants: unknown group $group (crashmonkey, nbd-server, fs-core)" >&2
        exit 2
        ;;
    esac
    local out=$OUT/$group what=${SHARD:-all mutants}
    local -a args=(--test-package "$group" --timeout "$TEST_TIMEOUT_SECONDS" --no-shuffle)
    for f in "${files[@]}"; do args+=(--file "$f"); done
    # As cargo arguments (not after `--`), so that the build step too builds only these test
    # targets: otherwise every mutant relinks all of the crate's integration tests.
    for t in "${tests[@]}"; do args+=(--cargo-arg "$t"); done
    if [[ ${MUTANTS_ITERATE:-0} == 1 ]]; then
        # Exactly the mutants the last run missed or timed out on, by name, into
        # $OUT/<group>-retest (the last run's results stay). cargo-mutants' own --iterate
        # with --shard draws a new sample of the untested mutants instead. Names carry line
        # numbers: retest before changing the mutated files above a missed mutant.
        local last=$OUT/$group/mutants.out re
        re=$({ cat "$last/missed.txt" "$last/timeout.txt" 2>/dev/null || true; } | python3 -c \
            'import re, sys; print("|".join(re.escape(l.strip()) for l in sys.stdin if l.strip()))')
        if [[ -z $re ]]; then
            echo "mutants: $group: nothing missed in $last to retest"
            return 0
        fi
        args+=(-F "$re")
        out=$OUT/$group-retest what="the last run's missed mutants"
    elif [[ -n $SHARD ]]; then
        args+=(--shard "$SHARD" --sharding round-robin)
    fi
    args+=(--output "$out")
    mkdir -p "$out"
    echo "mutants: $group ($what) -> $out"
    # Exit 2 means "some mutants missed": a measurement, not a failure of this script.
    cargo mutants "${args[@]}" || [[ $? == 2 || $? == 3 ]]
}

for g in $GROUPS_WANTED; do run_group "$g"; done

# A table per source file: caught / missed / unviable / timeout, and the caught share of viable.
python3 - "$OUT" $GROUPS_WANTED <<'EOF'
import json, sys, collections, os
out, groups = sys.argv[1], sys.argv[2:]
print(f"{'file':48} {'caught':>6} {'missed':>6} {'unviable':>8} {'timeout':>7} {'caught%':>7}")
for g in [g + suffix for g in groups for suffix in ("", "-retest")]:
    path = os.path.join(out, g, "mutants.out", "outcomes.json")
    if not os.path.exists(path):
        continue
    print(f"{g}:")
    rows = collections.defaultdict(collections.Counter)
    for o in json.load(open(path))["outcomes"]:
        scen = o["scenario"]
        if scen == "Baseline":
            continue
        f = scen["Mutant"]["file"]
        rows[f][o["summary"]] += 1
    for f, c in sorted(rows.items()):
        caught, missed = c["CaughtMutant"], c["MissedMutant"]
        viable = caught + missed + c["Timeout"]
        pct = f"{100 * (caught + c['Timeout']) / viable:.0f}%" if viable else "-"
        print(f"{f:48} {caught:6} {missed:6} {c['Unviable']:8} {c['Timeout']:7} {pct:>7}")
EOF
