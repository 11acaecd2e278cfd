#!/usr/bin/env bash
# Two levels of crash, with a real kernel on top of fs-core: nbd-server serves `vm`, a file of
# an fs-core volume whose emulated disk is recorded -> nbdfuse -> loop device -> ext4 -> a
# workload that writes files, fsyncs each and sets a mark after each fsync -> umount. Then
# `crashmonkey check` builds every crash state of the disk UNDER fs-core, and a verify script
# mounts fs-core's crash state (journal recovery, in memory), takes the guest file out
# (`crashmonkey fs cat {image} vm`), mounts the ext4 inside it (ext4's own recovery), compares
# every file fsynced before the state's mark and runs e2fsck -fn.
#
# Run twice: with fs-core's defaults no state may fail; with the planted bug
# bug=fsync-no-log-force (fsync flushes the disk but does not commit fs-core's journal, so the
# extents ext4's data went to are not durable) some states must fail, each with its bundle.
#
# Needs root, FUSE, loop devices, nbdfuse, mkfs.ext4, e2fsck. Under CI nothing skips.
# Env: E2E_FILES=6, E2E_SAMPLES=8, E2E_SEED=1, E2E_JOBS=2, E2E_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
SCRIPT_NAME=e2e-fscore

[[ $(id -u) == 0 ]] || skip "needs root (loop devices, mount)"
[[ -e /dev/fuse ]] || skip "no /dev/fuse"
for t in nbdfuse fusermount3 losetup mount umount mkfs.ext4 e2fsck cmp; do
    command -v "$t" >/dev/null || skip "missing tool $t"
done
losetup -f >/dev/null 2>&1 || skip "no free loop device"

FILES=${E2E_FILES:-6}
SAMPLES=${E2E_SAMPLES:-8}
SEED=${E2E_SEED:-1}
JOBS=${E2E_JOBS:-2}

cargo build --release -q -p nbd-server -p crashmonkey
BIN=$(release_dir)
WORK=$(mktemp -d /tmp/nbd-e2e-fscore.XXXXXX)
SERVER_PID=""
LOOP=""

cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" 2>/dev/null && umount "$WORK/mnt"
    [[ -n "$LOOP" ]] && losetup -d "$LOOP" 2>/dev/null
    mountpoint -q "$WORK/fuse" 2>/dev/null && fusermount3 -u "$WORK/fuse"
    [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    for m in "$WORK"/*/v.*/mnt; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    if [[ "${E2E_KEEP:-}" == "1" ]]; then echo "e2e-fscore: work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT


# Run by crashmonkey as `verify.sh CRASHMONKEY EXPECT_DIR {image} {mark}`.
cat > "$WORK/verify.sh" <<'VERIFY'
#!/usr/bin/env bash
set -uo pipefail
cm=$1 expect=$2 image=$3 mark=$4
[[ -z "$mark" ]] && exit 0   # before mark f0 (mkfs of the guest in progress): no claim
if [[ ! $mark =~ ^f(0|[1-9][0-9]*)$ ]]; then
    echo "malformed mark '$mark' (expected f<N>)"; exit 1
fi
n=${mark#f}
echo "$n" >> "$(dirname "$expect")/claims"
dir=$(mktemp -d "$(dirname "$expect")/v.XXXXXX")
trap 'mountpoint -q "$dir/mnt" && umount "$dir/mnt"; rm -rf "$dir"' EXIT
mkdir "$dir/mnt"
# Level 1: fs-core's crash state, mounted with recovery (in memory), the guest file taken out.
if ! "$cm" fs cat "$image" vm > "$dir/vm.img" 2> "$dir/cat.err"; then
    echo "fs-core's crash state does not mount or has no file vm:"; cat "$dir/cat.err"; exit 1
fi
# Level 2: ext4 inside it, with its own journal recovery.
if ! mount -t ext4 -o loop "$dir/vm.img" "$dir/mnt" 2> "$dir/mount.err"; then
    echo "the guest ext4 does not mount:"; cat "$dir/mount.err"; exit 1
fi
bad=0
for i in $(seq 1 "$n"); do
    if ! cmp -s "$expect/f$i" "$dir/mnt/f$i"; then
        echo "f$i (fsynced before mark $mark) differs or is missing in the guest"; bad=1
    fi
done
umount "$dir/mnt" || { echo "umount failed"; exit 1; }
e2fsck -fn "$dir/vm.img" > "$dir/fsck.out" 2>&1 || {
    echo "e2fsck -fn found problems in the guest:"; head -20 "$dir/fsck.out"; bad=1; }
exit $bad
VERIFY
chmod +x "$WORK/verify.sh"

# scenario NAME KEYS: run the guest workload on an fscore export with KEYS; check its log.
# Sets FAILED and PASSED.
scenario() {
    local name=$1 keys=$2
    echo "=== e2e-fscore: $name (fscore keys: ${keys:-defaults})"
    local D=$WORK/$name
    mkdir -p "$D/expect" "$WORK/fuse" "$WORK/mnt"
    local LOG=$D/disk.log
    "$BIN/nbd-server" --listen 127.0.0.1:0 \
        --export "vm:size=64M,fscore=mem,cache-folios=4096,sched-seed=$SEED,record=$LOG${keys:+,$keys}" \
        --control "$WORK/ctl" 2>"$D/server.err" &
    SERVER_PID=$!
    wait_for "nbd-server" grep -q "listening on" "$D/server.err"
    local PORT
    PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$D/server.err" | cut -d: -f2)
    nbdfuse -P "$D/nbdfuse.pid" "$WORK/fuse/disk" "nbd://127.0.0.1:$PORT/vm" &
    wait_for "nbdfuse" test -e "$WORK/fuse/disk"
    LOOP=$(losetup -f --show "$WORK/fuse/disk")
    mkfs.ext4 -q -F -b 4096 -E nodiscard "$LOOP"
    mount -t ext4 "$LOOP" "$WORK/mnt"
    sync -f "$WORK/mnt"
    "$BIN/nbd-server" ctl --socket "$WORK/ctl" mark f0 >/dev/null
    for i in $(seq 1 "$FILES"); do
        head -c $((i * 12288 + 777)) < <(yes "fscore file $i seed $SEED") > "$D/expect/f$i"
        cp "$D/expect/f$i" "$WORK/mnt/f$i"
        sync "$WORK/mnt/f$i" "$WORK/mnt"
        "$BIN/nbd-server" ctl --socket "$WORK/ctl" mark "f$i" >/dev/null
    done
    umount "$WORK/mnt"
    losetup -d "$LOOP"; LOOP=""
    fusermount3 -u "$WORK/fuse"
    kill -TERM "$SERVER_PID"
    local server_rc=0; wait "$SERVER_PID" || server_rc=$?; SERVER_PID=""
    if [[ $server_rc != 0 ]]; then
        echo "e2e-fscore: FAIL: nbd-server exited $server_rc at SIGTERM:" >&2
        tail -20 "$D/server.err" >&2
        exit 1
    fi
    "$BIN/crashmonkey" log stats "$LOG" --json > "$D/stats.json"
    if ! grep -q '"ending_text":"complete"' "$D/stats.json"; then
        echo "e2e-fscore: FAIL: the write log does not end complete" >&2
        exit 1
    fi
    # The disk under fs-core started as zeros (a memory volume): the log's base.
    truncate -s "$(grep -o '"disk_bytes":[0-9]*' "$D/stats.json" | cut -d: -f2)" "$D/base.img"
    set +e
    "$BIN/crashmonkey" check "$LOG" --base "$D/base.img" \
        --checker "$WORK/verify.sh $BIN/crashmonkey $D/expect {image} {mark}" \
        --jobs "$JOBS" --max-subset 1 --samples "$SAMPLES" --seed "$SEED" --atomic-bytes 4096 \
        --out "$D/failures" --json > "$D/summary.json"
    set -e
    field() { grep -o "\"$1\":[0-9]*" "$D/summary.json" | head -1 | cut -d: -f2; }
    PASSED=$(field passed) FAILED=$(field failed)
    local claims
    claims=$(wc -l < "$D/claims" 2>/dev/null || echo 0)
    echo "e2e-fscore: $name: $(field states) crash states of the disk under fs-core" \
        "($(field unique) unique): $PASSED passed, $FAILED failed; $claims after a mark"
    [[ $claims -gt 0 ]] || { echo "e2e-fscore: FAIL: no state after a mark was verified" >&2; exit 1; }
}

scenario defaults ""
if [[ $FAILED != 0 ]]; then
    echo "e2e-fscore: FAIL: crash states fail with fs-core's defaults; see $WORK/defaults/failures" >&2
    for f in "$WORK"/defaults/failures/*.txt; do [[ -e $f ]] && head -20 "$f" >&2; done
    E2E_KEEP=1
    exit 1
fi
scenario planted-bug "bug=fsync-no-log-force"
if [[ $FAILED == 0 ]]; then
    echo "e2e-fscore: FAIL: with bug=fsync-no-log-force no crash state failed" >&2
    exit 1
fi
bundles=$(find "$WORK/planted-bug/failures" -mindepth 1 -maxdepth 1 | wc -l)
[[ $bundles -gt 0 ]] || { echo "e2e-fscore: FAIL: failing states left no bundle" >&2; exit 1; }
echo "e2e-fscore: OK: no state fails with the defaults; bug=fsync-no-log-force fails" \
    "$FAILED states (their images and checker output in the check's --out)"
