#!/usr/bin/env bash
# make demo: the project's main job, with nothing but cargo and no root.
# Runs fs-core race campaigns with each stale-mapping fix switched off (they find data loss),
# then the same seeds with every fix on (they find none), side by side; shows the first
# finding, where its reproducer was written, and replays it with and without the fix.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-20000}
SEED=${SEED:-1}
OUT=${OUT:-crashmonkey-out/demo}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CM=$(release_dir)/crashmonkey

echo "== building crashmonkey (release)"
cargo build --release -q -p crashmonkey
rm -rf "$OUT"
mkdir -p "$OUT"

field() { # field NAME JSONFILE -> the number (or null) after "NAME":
  grep -o "\"$1\": *[0-9.a-z]*" "$2" | head -1 | sed 's/.*: *//'
}

# campaign NAME ARGS...: run a campaign; crashmonkey exits 1 when it finds failures, which
# is the expected outcome with a fix off, so only exit codes other than 0 and 1 are errors.
campaign() {
  local name=$1
  shift
  local rc=0
  "$CM" race --seed "$SEED" --runs "$RUNS" --json --out "$OUT/$name" "$@" >"$OUT/$name.json" || rc=$?
  if [ "$rc" -gt 1 ]; then
    echo "crashmonkey race $* failed (exit $rc)" >&2
    exit "$rc"
  fi
}

echo "== $RUNS unhinted runs per campaign, seeds $SEED..$((SEED + RUNS - 1)) (random and PCT schedules)"
start=$(date +%s)
campaign fix-on
campaign no-iomap-valid --no-iomap-valid
campaign no-wb-seq-check --no-wb-seq-check
# S3 needs a writeback pass longer than one lookup batch (15 folios); the generated files
# have at most 5, so a batch of one folio stands in for a longer file.
campaign no-wb-seq-check-batch1 --no-wb-seq-check --wb-batch-folios 1
campaign old-punch --old-punch
campaign gfs2-like --alloc at-write
campaign gfs2-like-glock --alloc at-write --mkwrite-inode-lock
campaign gfs2 --fs gfs2
campaign gfs2-no-write-glock --fs gfs2 --gfs2-without write-glock
campaign get-folio --check-at get-folio
campaign before-lock --check-at before-lock
# The same campaigns with large folios: 16 KiB folios of four 4 KiB blocks.
campaign large-fix-on --folio-blocks 4
campaign large-no-iomap-valid --folio-blocks 4 --no-iomap-valid
campaign large-no-wb-seq-check --folio-blocks 4 --no-wb-seq-check
# Direct writes raced too: the page cache dropped after ->end_io (the kernel) or before it.
campaign dio-fix-on --direct-writes
campaign dio-invalidate-early --direct-writes --dio-invalidate before-end-io
end=$(date +%s)

row() { # row LABEL NAME
  local first
  first=$(field first_failure_seed "$OUT/$2.json")
  [ "$first" = "null" ] && first="-"
  printf "  %-58s %6s failing runs  (first: seed %s; %s s)\n" "$1" "$(field failures "$OUT/$2.json")" \
    "$first" "$(field seconds "$OUT/$2.json" | cut -c1-4)"
}

echo
echo "== results (same seeds in every row)"
echo " fix OFF:"
row "write path without ->iomap_valid (S1, S2: stale iomap)" no-iomap-valid
row "writeback without the seq check, files < 1 batch (S3)" no-wb-seq-check
row "writeback without the seq check, batch of 1 folio (S3)" no-wb-seq-check-batch1
row "old short-write delalloc punch (S2')" old-punch
echo " fix ON (the defaults):"
row "iomap_valid after folio lock + wb seq check + fixed punch" fix-on
echo " the thread's open questions:"
row "Q2: cookie checked inside ->get_folio instead" get-folio
row "Q2: cookie checked before the folio lock (racy placement)" before-lock
row "Q1: gfs2-like (allocate at write, no delalloc/unwritten)" gfs2-like
row "Q1: gfs2-like, page_mkwrite serialised by the inode glock" gfs2-like-glock
row "Q1: gfs2 as built (--fs gfs2: its glocks, no cookie)" gfs2
row "Q1: gfs2, but the write does not hold the glock" gfs2-no-write-glock
echo " large folios (--folio-blocks 4: per-block uptodate and dirty bits):"
row "fix ON (the defaults)" large-fix-on
row "write path without ->iomap_valid" large-no-iomap-valid
row "writeback without the seq check, files < 1 batch (S3)" large-no-wb-seq-check
echo " direct writes raced (--direct-writes: O_DIRECT writes beside the buffered IO):"
row "fix ON (page cache dropped after ->end_io converts)" dio-fix-on
row "page cache dropped before ->end_io (a read caches zeros)" dio-invalidate-early
echo "  (all campaigns: $((end - start)) s)"

bundle=$(ls -d "$OUT"/no-iomap-valid/race-seed-* | head -1)
echo
echo "== the shortest stale-mapping finding (write path without ->iomap_valid)"
echo "   How to read it: op<N> are the workload's operations, flusher/io-completion/reclaim the"
echo "   kernel's background work. Each line is a run of steps of one task (step@folio or"
echo "   @byte offset). iomap_begin caches a mapping; if writeback (wb:map_blocks, DELALLOC ->"
echo "   UNWRITTEN), IO completion (io:convert_unwritten, UNWRITTEN -> WRITTEN) and reclaim"
echo "   change or drop what it describes before the write reaches that folio, write_begin"
echo "   trusts the stale mapping and zero-fills bytes that hold data on disk."
echo
sed -n '1,200p' "$bundle/report.txt"
echo
echo "reproducer written to: $bundle"
echo "  (bundle.json: switches, workload, the materialised schedule; device-log.json: every"
echo "   device write in completion order; device.log: the same run recorded by nbd-server's"
echo "   emulated disk, in the write-log format; README.md: how to replay)"
echo
report="$OUT/no-iomap-valid.html"
if "$CM" report "$OUT/no-iomap-valid" -o "$report" >/dev/null; then
  echo "the campaign as one HTML page (a timeline per finding; open it in a browser): $report"
  echo
fi
echo "== replay it exactly:  $CM race --replay $bundle"
"$CM" race --replay "$bundle" | tail -1 || true
echo "== replay the same interleaving with the fix on:  $CM race --replay $bundle --defaults"
"$CM" race --replay "$bundle" --defaults | tail -1
echo
echo "== the same run as nbd-server's emulated disk recorded it:  $CM log show $bundle/device.log"
{ "$CM" log show "$bundle/device.log" || true; } | head -12
echo "== and the crash states a power cut during it could leave:  $CM states $bundle/device.log"
"$CM" states "$bundle/device.log" 2>/dev/null | tail -1
echo
echo
echo "== fs-core on disk: a crash campaign finds a planted bug, and shows the wrong bytes"
echo "   Each run formats a fresh fs-core filesystem on the emulated disk, runs an ace workload"
echo "   (an operation, then fsync/fdatasync/sync), and checks every crash state of the write log"
echo "   it recorded: mounted with journal recovery, fsck'd, judged by the crash oracle."
FS_RUNS=${FS_RUNS:-300}
rm -rf "$OUT/fs-bug"
"$CM" fs campaign --seed 1 --runs "$FS_RUNS" --bug size-before-data --max-failures 1 \
    --out "$OUT/fs-bug" >"$OUT/fs-bug.txt" || true
sed -n '1,2p' "$OUT/fs-bug.txt"
fsb=$(ls -d "$OUT"/fs-bug/fs-seed-* 2>/dev/null | head -1)
if [ -z "$fsb" ]; then
  echo "demo: UNEXPECTED: no fs campaign finding with size-before-data" >&2
  exit 1
fi
sed -n '1,3p' "$fsb/oracle.txt"
file=$(sed -n '2s/:.*//p' "$fsb/oracle.txt")
byte=$(sed -n '2s/^[^:]*: byte \([0-9]*\):.*/\1/p' "$fsb/oracle.txt")
echo "== $CM fs stat $fsb/crash.img $file"
"$CM" fs stat "$fsb/crash.img" "$file" 2>/dev/null | sed -n '1,12p'
if [ -n "$byte" ]; then
  from=$(( byte >= 16 ? byte - 16 : 0 ))
  echo "== the wrong bytes:  $CM fs cat $fsb/crash.img $file | od -A d -c -j $from -N 32"
  "$CM" fs cat "$fsb/crash.img" "$file" 2>/dev/null | od -A d -c -j "$from" -N 32
fi
echo "== seeds 1..$FS_RUNS with the defaults (no planted bug):"
"$CM" fs campaign --seed 1 --runs "$FS_RUNS" --json --no-bundle >"$OUT/fs-defaults.json"
fs_on=$(field failures "$OUT/fs-defaults.json")
echo "   $FS_RUNS runs, $(field crash_states "$OUT/fs-defaults.json") crash states, $fs_on failing"
if [ "$fs_on" != "0" ]; then
  echo "demo: UNEXPECTED: fs campaign with the defaults found $fs_on failing runs" >&2
  exit 1
fi

on=$(field failures "$OUT/fix-on.json")
off=$(field failures "$OUT/no-iomap-valid.json")
if [ "$on" != "0" ] || [ "$off" = "0" ]; then
  echo "demo: UNEXPECTED: fix off found $off failing runs, fix on found $on" >&2
  exit 1
fi
echo "demo: OK: without ->iomap_valid $off of $RUNS runs lost data; with every fix on, 0 of $RUNS."
