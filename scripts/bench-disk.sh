#!/usr/bin/env bash
# Benchmarks of the emulated disk and of crash-state checking (numbers, never assertions).
#
# 1. fio (nbd engine) random 4 KiB writes through nbd-server, recording off and on, in the
#    same run, alternating, best of BENCH_ROUNDS each. Target: recording costs <= 10% IOPS.
#    Also recording with record-sync=flush (each FLUSH waits for fdatasync of the log).
# 2. `crashmonkey check` with `true {image}` and with `true {uri}` (the state served over NBD
#    by the in-process server), one after the other on the same log, on a synthetic log of
#    10,000 4 KiB writes in 100 epochs, and on the doubled log (20,000 writes, 200 epochs):
#    states per second, CPU per state (crashmonkey and its checkers, user + system, then each
#    apart from the summary's `cpu`) and peak RSS. Target: linear (the same states per second
#    on both).
# 3. Issue 21's 1 GiB log (BENCH_BIG=1, the default; skipped below BIG_FREE_MIB_MIN free):
#    fio random 4 KiB writes, iodepth 32, fsync every 256, over a recorded 1 GiB export
#    (262,144 writes), built here and removed after; `check --max-subset 1 --samples 2`
#    with `true {uri}` and `true {image}`, then two more rounds of both logs' `{uri}` runs
#    and the ratio of the medians of three. Target: `{uri}` >= 0.8x its rate on the 10,000-write log, >= 2,000 states/s,
#    RSS < 300 MB.
# Env: BENCH_SECONDS=5, BENCH_ROUNDS=5, BENCH_SAMPLES=32, BENCH_JOBS=2, BENCH_FIO=1 (0 skips
# part 1), BENCH_BIG=1 (0 skips part 3).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-5}
SAMPLES=${BENCH_SAMPLES:-32}
JOBS=${BENCH_JOBS:-2}
FIO=${BENCH_FIO:-1}
BIG=${BENCH_BIG:-1}
# Free space part 3 needs in the work folder: the 1.09 GB log, the {image} run's images.
BIG_FREE_MIB_MIN=4096

cargo build --release -q -p nbd-server -p crashmonkey
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
BIN=$(release_dir)
WORK=$(mktemp -d /tmp/bench-disk.XXXXXX)
SERVER_PID=""
cleanup() {
    [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

fio_iops() { # fio_iops EXPORT_SPEC -> prints write IOPS
    "$BIN/nbd-server" --listen 127.0.0.1:0 --export "$1" 2>"$WORK/server.err" &
    SERVER_PID=$!
    for _ in $(seq 200); do grep -q "listening on" "$WORK/server.err" && break; sleep 0.1; done
    local port
    port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$WORK/server.err" | cut -d: -f2)
    fio --name=randwrite --ioengine=nbd --uri="nbd://127.0.0.1:$port/d" --rw=randwrite \
        --bs=4k --iodepth=32 --size=256M --fsync=256 --time_based --runtime="$SECONDS_RUN" \
        --randseed=1 --output-format=json 2>/dev/null | sed -n "/^{/,\$p" > "$WORK/fio.json"
    kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
    python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$WORK/fio.json"
}

if [[ "$FIO" == 0 ]]; then
    echo "BENCH_FIO=0: skipping the fio part"
elif command -v fio >/dev/null && fio --enghelp=nbd >/dev/null 2>&1; then
    best_off=0 best_on=0 losses="" synced_all=""
    for r in $(seq "$ROUNDS"); do
        # cache=64M (the default size, given explicitly) keeps the emulated disk in front:
        # a plain memory export without it would be served with no disk at all.
        off=$(fio_iops "d:size=256M,cache=64M")
        on=$(fio_iops "d:size=256M,record=$WORK/rec.log")
        log_mib=$(( $(stat -c %s "$WORK/rec.log") / 1048576 ))
        rm -f "$WORK/rec.log"
        # record-sync=flush: every FLUSH also waits for fdatasync of the log.
        synced=$(fio_iops "d:size=256M,record=$WORK/rec.log,record-sync=flush")
        rm -f "$WORK/rec.log"
        synced_all="$synced_all $(python3 -c 'import sys; off,on=map(int,sys.argv[1:]); print(f"{100*(off-on)/off:.1f}")' "$off" "$synced")"
        echo "round $r: recording off $off IOPS, on $on IOPS (log $log_mib MiB), on with record-sync=flush $synced IOPS"
        losses="$losses $(python3 -c 'import sys; off,on=map(int,sys.argv[1:]); print(f"{100*(off-on)/off:.1f}")' "$off" "$on")"
        (( off > best_off )) && best_off=$off
        (( on > best_on )) && best_on=$on
    done
    (( best_off > 0 )) && python3 -c 'import sys; off,on=map(int,sys.argv[1:]); print(f"fio randwrite 4k qd32: recording off {off} IOPS, on {on} IOPS: {100*(off-on)/off:+.1f}% loss (target <= 10%)")' "$best_off" "$best_on"
    python3 -c 'import sys,statistics; l=[float(x) for x in sys.argv[1:]]; print(f"per-round loss (same round, off then on): median {statistics.median(l):+.1f}%, rounds: {l}")' $losses
    python3 -c 'import sys,statistics; l=[float(x) for x in sys.argv[1:]]; print(f"per-round loss with record-sync=flush: median {statistics.median(l):+.1f}%, rounds: {l}")' $synced_all
else
    echo "fio with the nbd engine not found: skipping the fio part"
fi

# A synthetic dm-log-writes log: WRITES random 4 KiB writes, a flush every 100, imported.
make_log() { # make_log WRITES OUT
    python3 - "$1" "$WORK/gen.dmlog" <<'PY'
import random, struct, sys
n, out = int(sys.argv[1]), sys.argv[2]
rng = random.Random(1)
sectors = 256 * 1024 * 1024 // 512
with open(out, "wb") as f:
    f.write(b"\0" * 512)
    entries = 0
    for i in range(n):
        sector = rng.randrange(0, sectors - 8) // 8 * 8
        f.write(struct.pack("<QQQQ", sector, 8, 0, 0).ljust(512, b"\0"))
        f.write(bytes([i % 251 + 1]) * 4096)
        entries += 1
        if i % 100 == 99:
            f.write(struct.pack("<QQQQ", 0, 0, 1, 0).ljust(512, b"\0"))
            entries += 1
    f.seek(0)
    f.write(struct.pack("<QQQI", 0x6a736677736872, 1, entries, 512))
PY
    "$BIN/crashmonkey" log import "$WORK/gen.dmlog" --format dm-log-writes -o "$2" \
        --disk-bytes $((256 * 1024 * 1024)) >/dev/null
}

# check_rate LOG BASE CHECKER NAME [ARGS...]: one check run; prints states/s, CPU per state
# (crashmonkey plus the checkers it waited for) and peak RSS (crashmonkey's own).
check_rate() {
    local log=$1 base=$2 checker=$3 name=$4
    shift 4
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" "$BIN/crashmonkey" check "$log" --base "$base" \
        --checker "$checker" --jobs "$JOBS" --json "$@" > "$WORK/check.json"
    python3 - "$WORK/check.json" "$WORK/time" "$name" "$checker" "$WORK/rate" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
open(sys.argv[5], "w").write("%.1f" % (s["unique"] / s["seconds"]))
user, sys_, rss_kb = open(sys.argv[2]).read().split()[-3:]
cpu = float(user) + float(sys_)
own = s.get("cpu") or {"crashmonkey": float("nan"), "checkers": float("nan")}
print("crashmonkey check --checker '%s' on %s, %d epochs: %d states (%d unique) in %.1f s = "
      "%.0f states/s, CPU %.2f ms/state (user %s s, sys %s s; crashmonkey's own %.2f ms, "
      "its checkers' %.2f ms), peak RSS %.0f MB"
      % (sys.argv[4], sys.argv[3], s["epochs"], s["states"], s["unique"], s["seconds"],
         s["unique"] / s["seconds"], 1000 * cpu / s["unique"], user, sys_,
         1000 * own["crashmonkey"] / s["unique"], 1000 * own["checkers"] / s["unique"],
         int(rss_kb) / 1024))
PY
}

truncate -s 256M "$WORK/base.img"
for writes in 10000 20000; do
    make_log "$writes" "$WORK/w$writes.log"
    for checker in 'true {image}' 'true {uri}'; do
        check_rate "$WORK/w$writes.log" "$WORK/base.img" "$checker" "$writes writes" \
            --samples "$SAMPLES"
        if [[ "$writes/$checker" == "10000/true {uri}" ]]; then small_uri_rate=$(cat "$WORK/rate"); fi
    done
done

# Issue 21's 1 GiB log, recorded by nbd-server under fio.
big_log() { # big_log OUT
    "$BIN/nbd-server" --listen 127.0.0.1:0 --export "d:size=1G,record=$1" 2>"$WORK/server.err" &
    SERVER_PID=$!
    for _ in $(seq 200); do grep -q "listening on" "$WORK/server.err" && break; sleep 0.1; done
    local port
    port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$WORK/server.err" | cut -d: -f2)
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$port/d" --rw=randwrite --bs=4k \
        --iodepth=32 --size=1G --fsync=256 --randseed=1 >/dev/null 2>&1
    kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
}

if [[ "$BIG" == 1 ]]; then
    free_mib=$(( $(df --output=avail -k "$WORK" | tail -1) / 1024 ))
    if (( free_mib < BIG_FREE_MIB_MIN )); then
        echo "only $free_mib MiB free in $WORK (< $BIG_FREE_MIB_MIN): skipping the 1 GiB log"
    elif command -v fio >/dev/null && fio --enghelp=nbd >/dev/null 2>&1; then
        big_log "$WORK/big.log"
        # The log's gigabyte is written back before it is measured, so that the check does
        # not compete with that writeback (one run each: 1,080 states/s without, 1,167 with).
        sync
        echo "1 GiB log: $(stat -c %s "$WORK/big.log") bytes"
        truncate -s 1G "$WORK/big.img"
        # {image} first, as for the small logs above: every {uri} run then reads a log that
        # was read before, as the small log's {uri} runs do.
        for checker in 'true {image}' 'true {uri}'; do
            check_rate "$WORK/big.log" "$WORK/big.img" "$checker" "the 1 GiB log" \
                --max-subset 1 --samples 2
            if [[ "$checker" == 'true {uri}' ]]; then big_uri_rate=$(cat "$WORK/rate"); fi
        done
        # One run each is noisy here (+-5%): two more rounds of both `{uri}` runs,
        # alternating, and the ratio of the medians.
        big_rates="$big_uri_rate" small_rates="$small_uri_rate"
        for _ in 2 3; do
            check_rate "$WORK/w10000.log" "$WORK/base.img" 'true {uri}' "10000 writes" \
                --samples "$SAMPLES"
            small_rates="$small_rates $(cat "$WORK/rate")"
            check_rate "$WORK/big.log" "$WORK/big.img" 'true {uri}' "the 1 GiB log" \
                --max-subset 1 --samples 2
            big_rates="$big_rates $(cat "$WORK/rate")"
        done
        python3 -c 'import sys, statistics as st; b, s = (st.median(map(float, a.split())) for a in sys.argv[1:]); print(
            "the 1 GiB log at %.2fx the 10,000-write log with true {uri} (medians of three: %.0f and %.0f states/s; target 0.8x)" % (b / s, b, s))' \
            "$big_rates" "$small_rates"
        rm -f "$WORK/big.log" "$WORK/big.img"
    else
        echo "fio with the nbd engine not found: skipping the 1 GiB log"
    fi
fi
