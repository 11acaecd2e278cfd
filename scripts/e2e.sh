#!/usr/bin/env bash
# A real kernel end to end: nbd-server (recording) -> nbdfuse -> loop device -> ext4, then XFS
# -> mount -> a workload that writes files, fsyncs each and sets a mark after each fsync ->
# umount -> crashmonkey check of every crash state with a verify script that mounts a COPY of
# each state's image (so the kernel replays the journal, as after a real power cut), checks
# every file fsynced before the state's last mark, then runs the filesystem's checker
# (e2fsck -fn / xfs_repair -n) on the recovered copy. Mark f0 is set once mkfs, the mount
# and a sync are done: from it on, every state must mount and pass fsck (f0 claims no file).
# States before f0 (mkfs in progress) make no claim. A mark that is not f<N> fails the state.
# The server must exit cleanly (0) and the log must end complete (no torn tail).
# Expected: zero failing states.
#
# The disk is modelled as a 4Kn device (--atomic-bytes 4096): a torn write lands whole 4 KiB
# units. ext4 and XFS write checksummed metadata blocks (the ext4 superblock, for one) that
# they assume land whole; at 512-byte granularity a torn superblock write makes ext4 refuse to
# mount (try `crashmonkey check ... --atomic-bytes 512` to see it).
#
# Needs root, FUSE, loop devices, nbdfuse, mkfs.ext4/mkfs.xfs. Under CI nothing skips.
# Env: E2E_FS="ext4 xfs", E2E_FILES=8, E2E_SAMPLES=16, E2E_SEED=1, E2E_JOBS=2, E2E_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
SCRIPT_NAME=e2e

[[ $(id -u) == 0 ]] || skip "needs root (loop devices, mount)"
[[ -e /dev/fuse ]] || skip "no /dev/fuse"
for t in nbdfuse fusermount3 losetup mount umount mkfs.ext4 mkfs.xfs e2fsck xfs_repair cmp xfs_io setfattr sqlite3; do
    command -v "$t" >/dev/null || skip "missing tool $t"
done
losetup -f >/dev/null 2>&1 || skip "no free loop device"

FS_LIST=${E2E_FS:-ext4 xfs}
FILES=${E2E_FILES:-8}
SAMPLES=${E2E_SAMPLES:-16}
SEED=${E2E_SEED:-1}
JOBS=${E2E_JOBS:-2}

cargo build --release -q -p nbd-server -p crashmonkey
BIN=$(release_dir)
WORK=$(mktemp -d /tmp/nbd-e2e.XXXXXX)
SERVER_PID=""
LOOP=""

cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" 2>/dev/null && umount "$WORK/mnt"
    [[ -n "$LOOP" ]] && losetup -d "$LOOP" 2>/dev/null
    mountpoint -q "$WORK/fuse" 2>/dev/null && fusermount3 -u "$WORK/fuse"
    [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    # Verify-script leftovers (a checker killed mid-way).
    for m in "$WORK"/v.*/mnt; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    if [[ "${E2E_KEEP:-}" == "1" ]]; then echo "e2e: work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT


# The verify script: run by crashmonkey as `verify.sh FS EXPECT_DIR {image} {mark}`.
cat > "$WORK/verify.sh" <<'VERIFY'
#!/usr/bin/env bash
set -uo pipefail
fs=$1 expect=$2 image=$3 mark=$4
[[ -z "$mark" ]] && exit 0   # before mark f0 (mkfs in progress): no claim
if [[ ! $mark =~ ^f(0|[1-9][0-9]*)$ ]]; then
    echo "malformed mark '$mark' (expected f<N>): nothing to compare it with"; exit 1
fi
n=${mark#f}
echo "$n" >> "$(dirname "$expect")/claims"
dir=$(mktemp -d "$(dirname "$expect")/v.XXXXXX")
trap 'mountpoint -q "$dir/mnt" && umount "$dir/mnt"; rm -rf "$dir"' EXIT
mkdir "$dir/mnt"
cp --sparse=always "$image" "$dir/img"
opts=loop
[[ $fs == xfs ]] && opts=loop,nouuid
if ! mount -t "$fs" -o "$opts" "$dir/img" "$dir/mnt"; then
    echo "mount of the crash state failed"; exit 1
fi
bad=0
for i in $(seq 1 "$n"); do
    if ! cmp -s "$expect/f$i" "$dir/mnt/f$i"; then
        echo "f$i (fsynced before mark $mark) differs or is missing"; bad=1
    fi
done
umount "$dir/mnt" || { echo "umount failed"; exit 1; }
if [[ $fs == ext4 ]]; then
    e2fsck -fn "$dir/img" || { echo "e2fsck -fn found problems after recovery"; bad=1; }
else
    xfs_repair -n "$dir/img" || { echo "xfs_repair -n found problems after recovery"; bad=1; }
fi
exit $bad
VERIFY
chmod +x "$WORK/verify.sh"

total_states=0
for FS in $FS_LIST; do
    echo "=== e2e: $FS"
    SIZE=128M
    D=$WORK/$FS
    mkdir -p "$D/expect" "$WORK/fuse" "$WORK/mnt"
    LOG=$D/disk.log
    truncate -s $SIZE "$D/base.img"
    "$BIN/nbd-server" --listen 127.0.0.1:0 --export "d:size=$SIZE,record=$LOG" \
        --control "$WORK/ctl" 2>"$D/server.err" &
    SERVER_PID=$!
    wait_for "nbd-server" grep -q "listening on" "$D/server.err"
    PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$D/server.err" | cut -d: -f2)
    nbdfuse -P "$D/nbdfuse.pid" "$WORK/fuse/disk" "nbd://127.0.0.1:$PORT/d" &
    wait_for "nbdfuse" test -e "$WORK/fuse/disk"
    LOOP=$(losetup -f --show "$WORK/fuse/disk")
    if [[ $FS == ext4 ]]; then
        mkfs.ext4 -q -F -b 4096 "$LOOP"
    else
        # xfsprogs refuses filesystems under 300 MB unless run by a test suite.
        TEST_DIR=$WORK TEST_DEV=$LOOP QA_CHECK_FS=xfs mkfs.xfs -f -q "$LOOP"
    fi
    mount -t "$FS" "$LOOP" "$WORK/mnt"
    sync -f "$WORK/mnt"
    "$BIN/nbd-server" ctl --socket "$WORK/ctl" mark f0 >/dev/null
    for i in $(seq 1 "$FILES"); do
        # Deterministic content of a different size per file.
        head -c $((i * 12288 + 777)) < <(yes "$FS file $i seed $SEED") > "$D/expect/f$i"
        cp "$D/expect/f$i" "$WORK/mnt/f$i"
        sync "$WORK/mnt/f$i" "$WORK/mnt"   # fsync the file, then its directory
        "$BIN/nbd-server" ctl --socket "$WORK/ctl" mark "f$i" >/dev/null
    done
    umount "$WORK/mnt"
    losetup -d "$LOOP"; LOOP=""
    fusermount3 -u "$WORK/fuse"
    kill -TERM "$SERVER_PID"
    server_rc=0; wait "$SERVER_PID" || server_rc=$?; SERVER_PID=""
    if [[ $server_rc != 0 ]]; then
        echo "e2e: FAIL: nbd-server exited $server_rc at SIGTERM (expected a clean exit):" >&2
        tail -20 "$D/server.err" >&2
        exit 1
    fi
    "$BIN/crashmonkey" log stats "$LOG" --json | tee "$D/stats.json"
    echo
    if ! grep -q '"ending_text":"complete"' "$D/stats.json"; then
        echo "e2e: FAIL: the write log does not end complete: $(grep -o '"ending_text":"[^"]*"' "$D/stats.json")" >&2
        exit 1
    fi
    set +e
    "$BIN/crashmonkey" check "$LOG" --base "$D/base.img" \
        --checker "$WORK/verify.sh $FS $D/expect {image} {mark}" \
        --jobs "$JOBS" --max-subset 1 --samples "$SAMPLES" --seed "$SEED" --atomic-bytes 4096 \
        --out "$D/failures" --json > "$D/summary.json"
    rc=$?
    set -e
    field() { grep -o "\"$1\":[0-9]*" "$D/summary.json" | head -1 | cut -d: -f2; }
    states=$(field states) unique=$(field unique) passed=$(field passed) failed=$(field failed)
    claims=$(wc -l < "$D/claims" 2>/dev/null || echo 0)
    after_f0=$(grep -c '^0$' "$D/claims" 2>/dev/null || true)
    echo "e2e: $FS: $states crash states ($unique unique) checked: $passed passed, $failed failed;" \
        "$claims of them after a mark (mounted, files verified, fsck after recovery)," \
        "${after_f0:-0} of those between f0 and f1 (mount and fsck only)"
    total_states=$((total_states + unique))
    if [[ $rc != 0 || $failed != 0 ]]; then
        echo "e2e: FAIL: $FS has failing crash states; see $D/failures (set E2E_KEEP=1 to keep)" >&2
        ls "$D/failures" >&2 || true
        for f in "$D"/failures/*.txt; do [[ -e $f ]] && head -20 "$f" >&2; done
        exit 1
    fi
    [[ $passed -gt 0 ]] || { echo "e2e: FAIL: no state was checked" >&2; exit 1; }
    [[ $claims -gt 0 ]] || { echo "e2e: FAIL: no state after a mark was verified" >&2; exit 1; }
    [[ ${after_f0:-0} -gt 0 ]] || { echo "e2e: FAIL: no state between f0 and f1 was checked" >&2; exit 1; }
done
echo "e2e: OK: $total_states unique crash states checked across: $FS_LIST; none failed"

# Kernel campaigns (docs/kernel-campaigns.md): the committed workloads on an honest disk
# give no finding; a lying disk (flush=ignore) must give findings.
for FS in $FS_LIST; do
    "$BIN/crashmonkey" kernel --fs "$FS" --workload fixtures/workloads \
        || { echo "e2e: FAIL: crashmonkey kernel --fs $FS on an honest disk found something" >&2; exit 1; }
    rc=0; "$BIN/crashmonkey" kernel --fs "$FS" --limit 2 --lying-disk >/dev/null || rc=$?
    [[ $rc == 1 ]] || { echo "e2e: FAIL: crashmonkey kernel --fs $FS --lying-disk exited $rc, not 1 (findings)" >&2; exit 1; }
    echo "e2e: kernel $FS: honest disk no finding, lying disk findings"
done

# Application campaigns (docs/kernel-campaigns.md, "Application campaigns: crashmonkey run"):
# sqlite3, an application nobody here wrote, commits transactions and marks each after its
# COMMIT returned; the checker holds every crash state to the transactions committed before
# its mark. With the durability SQLite's documentation promises (WAL with synchronous=FULL;
# DELETE with synchronous=EXTRA): no finding. With what it says is weaker (synchronous=OFF;
# DELETE with FULL, whose commit, the journal's unlink, is not made durable), and with FULL on
# a lying disk: findings, every one in a durable state.
APP=fixtures/apps/sqlite
app_run() { # FS WANT_RC LABEL ARGS...
    local fs=$1 want=$2 label=$3 rc=0 out
    shift 3
    out=$("$BIN/crashmonkey" run --fs "$fs" --checker "sh $APP/check.sh {mnt} {mark}" --json "$@" 2>&1) || rc=$?
    local marks states failing
    marks=$(grep -o '"marks":\[[^]]*\]' <<<"$out" | tr -cd , | wc -c)
    states=$(grep -o '"states":[0-9]*' <<<"$out" | cut -d: -f2)
    failing=$(grep -o '"failing_states":[0-9]*' <<<"$out" | cut -d: -f2)
    echo "e2e: run $fs sqlite $label: $((marks + 1)) marks, $states crash states, $failing failing (exit $rc)"
    if [[ $rc != "$want" ]]; then
        echo "e2e: FAIL: crashmonkey run $fs sqlite $label exited $rc, not $want:" >&2
        echo "$out" >&2
        exit 1
    fi
    if [[ $want == 1 ]] && ! grep -q '"signatures":\["[a-z0-9]* [a-z]* disk: checker exit 1 in durable states"' <<<"$out"; then
        echo "e2e: FAIL: crashmonkey run $fs sqlite $label: not the finding explained in the docs:" >&2
        echo "$out" >&2
        exit 1
    fi
}
app_run ext4 0 "WAL synchronous=FULL, honest disk" --workload "sh $APP/workload.sh FULL WAL"
app_run xfs 0 "WAL synchronous=FULL, honest disk" --workload "sh $APP/workload.sh FULL WAL"
app_run ext4 0 "DELETE synchronous=EXTRA, honest disk" --workload "sh $APP/workload.sh EXTRA DELETE"
app_run ext4 1 "WAL synchronous=OFF, honest disk" --workload "sh $APP/workload.sh OFF WAL"
app_run ext4 1 "DELETE synchronous=FULL, honest disk" --workload "sh $APP/workload.sh FULL DELETE"
app_run ext4 1 "WAL synchronous=FULL, lying disk" --workload "sh $APP/workload.sh FULL WAL" --lying-disk
if grep -q crashmonkey-run /proc/self/mounts || losetup -a | grep -q crashmonkey-run; then
    echo "e2e: FAIL: crashmonkey run left a mount or a loop device:" >&2
    findmnt >&2; losetup -a >&2
    exit 1
fi
echo "e2e: run: sqlite keeps what its documentation promises; the weaker settings and the lying disk lose commits"
