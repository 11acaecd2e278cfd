#!/usr/bin/env bash
# Benchmark: the same fio jobs (nbd engine) against nbd-server's memory backend and against
# `nbdkit memory`, in the same run, and the ratio per job.
#   4K random write and read, iodepth 32; 1 MiB sequential write and read, iodepth 8.
# Both exports are first filled by the same sequential 1 MiB write over all of them, so every
# job measures the steady state of a written disk, not first-touch allocation (the kernel
# zeroing fresh pages), which would otherwise fall on whichever job runs first.
# Each job runs BENCH_ROUNDS times per server, alternating servers. Three ratios are printed:
# best round against best round (on a shared machine, other load only ever lowers a figure),
# median against median, and the median of the paired ratios (each round of ours against the
# nbdkit round right after it, which cancels the slow drifts of this VM; identical runs here
# differ by 10-25%, so this is the figure to quote), with the lowest and highest paired ratio
# of the rounds (the spread one round can show on this machine). Under each job, the CPU each
# server and fio used (median of the rounds, % of one core): on 2 cores, fio near 100% means
# the client sets the rate, and the server can only win by making the client's work per
# request cheaper.
# Then the 4K jobs again with 4 fio jobs (4 connections), where the client is no longer one
# thread at 100% of a core, so the servers' own costs decide; and the 4K jobs against the same
# export behind the emulated disk (a server with --control): no target, for context. The main
# export is plain memory: without --control, recording, faults or crash options nothing could
# observe an emulated disk's cache, so nbd-server serves it straight from memory.
# With BENCH_BASE_BIN=/path/to/an/older/nbd-server, that binary is measured in the same rounds
# (the order of the two nbd-servers alternates from round to round, nbdkit last), and under
# each job a line compares ours with it: paired median ratio ours/base and its range, so a
# change is judged against the noise of the same run (build the old commit beside the new
# one, e.g. in a second worktree with its own CARGO_TARGET_DIR).
# Last, the fs-core export (the export a file of an fs-core volume in memory: every request
# runs through the iomap model's scheduler) against the plain memory export, in the same
# rounds, the four main jobs: target >= 0.5x (a model, not a cache: it has a price).
# Env: BENCH_FSCORE_JOBS (default "1 2 3 4"), BENCH_SECONDS (default 6) per run, BENCH_ROUNDS (default 5), BENCH_SIZE (default 1G),
# BENCH_JOBS (default all: a space-separated subset of 1-8, the jobs in the order below).
# Last of all, the fs-core export's engine alone, in process (nbd-server/examples/fscore_engine.rs:
# the same volume, 4K random writes at 32 in flight, no sockets): its writes per second of one
# core against the memory export's 4K random write IOPS, the served export's ceiling.
# Under each fs-core job, the same export with a page cache as large as the export (as the
# kernel's would be with that much memory free), unless BENCH_FSCORE_LARGE=0. Both create
# folios of a request's size (4 KiB to 256 KiB: the export's max-folio-blocks=64).
# BENCH_FSCORE_KEYS: more keys for the fs-core export, e.g. BENCH_FSCORE_KEYS=folio-blocks=16
# (64 KiB folios) or cache-folios=262144 (a page cache as large as a 1 GiB export, as the
# kernel's would be with that much memory free). BENCH_FSCORE_WORKERS=N: that server's
# --workers N (threads serving connections beside the volume's engine thread).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_JOB=${BENCH_SECONDS:-6}
SIZE=${BENCH_SIZE:-1G}
ROUNDS=${BENCH_ROUNDS:-5}
BENCH_NAME=bench-nbd TOOLS="fio nbdkit python3" DISK_SERVER=1 FSCORE_SERVER=1
# shellcheck source=scripts/bench-servers.sh
source scripts/bench-servers.sh

ticks() { # pid -> CPU ticks (user + system) the process has used
  awk '{print $14 + $15}' "/proc/$1/stat"
}
run_job() { # uri name rw bs iodepth server-pid connections -> "iops bw_MiBps fio_cpu% server_cpu%"
  local t0 t1 w0 w1
  t0=$(ticks "$6"); w0=$(date +%s.%N)
  fio --name="$2" --ioengine=nbd --uri="$1" --rw="$3" --bs="$4" --iodepth="$5" \
      --numjobs="$7" --group_reporting \
      --size="$SIZE" --time_based --runtime="$SECONDS_PER_JOB" --ramp_time=1 \
      --output-format=json --output="$WORK/$2.json" >/dev/null
  t1=$(ticks "$6"); w1=$(date +%s.%N)
  python3 - "$WORK/$2.json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$w0" "$w1" "$7" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
server = int(sys.argv[2]) / int(sys.argv[3]) / (float(sys.argv[5]) - float(sys.argv[4])) * 100
# With group_reporting, fio's CPU figures are per job: all of fio is that times the jobs.
fio_cpu = (j["usr_cpu"] + j["sys_cpu"]) * int(sys.argv[6])
print(f'{side["iops"]:.0f} {side["bw"] / 1024:.1f} {fio_cpu:.0f} {server:.0f}')
PY
}

best() { # "iops bw" lines on stdin, field -> the largest value of that field
  sort -g -k"$1" | tail -1 | cut -d' ' -f"$1"
}
median() { # "iops bw" lines on stdin, field -> the median of that field
  cut -d' ' -f"$1" | sort -g | python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.stdin))'
}

# The paired median of column $1 of $2 over column $1 of $3 (round by round), then the range
# of the paired ratios: how far one round strays.
paired() { # field file-a file-b -> "ratio lo-hi"
  paste -d' ' "$2" "$3" | python3 -c '
import sys, statistics
f = int(sys.argv[1]) - 1
r = [float(l.split()[f]) / float(l.split()[4 + f]) for l in sys.stdin if float(l.split()[4 + f]) > 0]
print(f"{statistics.median(r):.2f}x {min(r):.2f}-{max(r):.2f}" if r else "n/a n/a")' "$1"
}

echo "bench-nbd: fio nbd engine, $SECONDS_PER_JOB s per run, $ROUNDS rounds, export size $SIZE, both prefilled; ratios ours/nbdkit"
[ -n "${BENCH_BASE_BIN:-}" ] && echo "base: $BENCH_BASE_BIN, measured in the same rounds (order of ours and base alternating)"
printf '%-25s %14s %14s %8s %8s %8s %11s\n' job nbd-server nbdkit-memory best median paired rounds
# Then fio with 4 jobs (4 connections, iodepth 32 each): no longer one client thread setting
# the rate, so the two servers' own costs show. Last, the 4K jobs against the export behind
# the emulated disk (what crash tests use; no recording). No target for these; for context.
JOBS=("randwrite 4k 32 iops 1 plain" "randread 4k 32 iops 1 plain"
      "write 1m 8 bw 1 plain" "read 1m 8 bw 1 plain"
      "randwrite 4k 32 iops 4 plain" "randread 4k 32 iops 4 plain"
      "randwrite 4k 32 iops 1 disk" "randread 4k 32 iops 1 disk")
for n in ${BENCH_JOBS:-1 2 3 4 5 6 7 8}; do
  job=${JOBS[$((n - 1))]}
  set -- $job
  if [ "$6" = disk ]; then uri=$DISK_URI; pid=${PIDS[2]}; else uri=$OURS_URI; pid=${PIDS[0]}; fi
  if [ "$6" = disk ]; then base_uri=${BASE_DISK_URI:-}; base_pid=${BASE_DISK_PID:-}
  else base_uri=${BASE_URI:-}; base_pid=${BASE_PID:-}; fi
  : >"$WORK/a"; : >"$WORK/b"; : >"$WORK/c"
  for r in $(seq 1 "$ROUNDS"); do
    if [ -n "$base_uri" ] && [ $((r % 2)) = 0 ]; then
      run_job "$base_uri" "base-$1-$2-$5-$6-$r" "$1" "$2" "$3" "$base_pid" "$5" >>"$WORK/c"
    fi
    run_job "$uri" "ours-$1-$2-$5-$6-$r" "$1" "$2" "$3" "$pid" "$5" >>"$WORK/a"
    if [ -n "$base_uri" ] && [ $((r % 2)) = 1 ]; then
      run_job "$base_uri" "base-$1-$2-$5-$6-$r" "$1" "$2" "$3" "$base_pid" "$5" >>"$WORK/c"
    fi
    run_job "$KIT_URI" "kit-$1-$2-$5-$r" "$1" "$2" "$3" "${PIDS[1]}" "$5" >>"$WORK/b"
  done
  if [ "$4" = iops ]; then f=1; unit=IOPS; else f=2; unit=MiB/s; fi
  x=$(best $f <"$WORK/a"); y=$(best $f <"$WORK/b")
  ratio=$(python3 -c "print(f'{$x/$y:.2f}x' if $y > 0 else 'n/a')")
  mx=$(median $f <"$WORK/a"); my=$(median $f <"$WORK/b")
  mratio=$(python3 -c "print(f'{$mx/$my:.2f}x' if $my > 0 else 'n/a')")
  read -r pratio spread < <(paired "$f" "$WORK/a" "$WORK/b")
  label="$1 bs=$2 qd=$3"; [ "$5" != 1 ] && label="$label x$5"; [ "$6" = disk ] && label="$label disk"
  printf '%-25s %14s %14s %8s %8s %8s %11s\n' "$label" "$x $unit" "$y $unit" "$ratio" "$mratio" "$pratio" "$spread"
  printf '  CPU, %% of a core (median of rounds): nbd-server %.0f%% (fio %.0f%%), nbdkit %.0f%% (fio %.0f%%)\n' \
    "$(median 4 <"$WORK/a")" "$(median 3 <"$WORK/a")" "$(median 4 <"$WORK/b")" "$(median 3 <"$WORK/b")"
  if [ -n "$base_uri" ]; then
    read -r bratio bspread < <(paired "$f" "$WORK/a" "$WORK/c")
    printf '  base: best %s %s, median %s %s; ours/base paired %s (rounds %s), CPU %.0f%% (fio %.0f%%)\n' \
      "$(best $f <"$WORK/c")" "$unit" "$(median $f <"$WORK/c" | sed 's/\.0$//')" "$unit" "$bratio" "$bspread" \
      "$(median 4 <"$WORK/c")" "$(median 3 <"$WORK/c")"
  fi
done
echo
printf '%-25s %14s %14s %8s %8s %11s\n' "job (fs-core export)" fscore memory best paired rounds
for n in ${BENCH_FSCORE_JOBS:-1 2 3 4}; do
  set -- ${JOBS[$((n - 1))]}
  : >"$WORK/a"; : >"$WORK/b"
  : >"$WORK/c"
  for r in $(seq 1 "$ROUNDS"); do
    run_job "$FSCORE_URI" "fscore-$1-$2-$r" "$1" "$2" "$3" "$FSCORE_PID" 1 >>"$WORK/a"
    if [ -n "${LARGE_URI:-}" ]; then
      run_job "$LARGE_URI" "large-$1-$2-$r" "$1" "$2" "$3" "$LARGE_PID" 1 >>"$WORK/c"
    fi
    run_job "$OURS_URI" "mem-$1-$2-$r" "$1" "$2" "$3" "${PIDS[0]}" 1 >>"$WORK/b"
  done
  if [ "$4" = iops ]; then f=1; unit=IOPS; else f=2; unit=MiB/s; fi
  if [ "$n" = 1 ]; then MEM_4K_WRITE_IOPS=$(median 1 <"$WORK/b"); fi
  x=$(best $f <"$WORK/a"); y=$(best $f <"$WORK/b")
  ratio=$(python3 -c "print(f'{$x/$y:.2f}x' if $y > 0 else 'n/a')")
  read -r pratio spread < <(paired "$f" "$WORK/a" "$WORK/b")
  printf '%-25s %14s %14s %8s %8s %11s\n' "$1 bs=$2 qd=$3" "$x $unit" "$y $unit" "$ratio" "$pratio" "$spread"
  printf '  CPU, %% of a core (median of rounds): fscore export %.0f%% (fio %.0f%%), memory export %.0f%% (fio %.0f%%)\n' \
    "$(median 4 <"$WORK/a")" "$(median 3 <"$WORK/a")" "$(median 4 <"$WORK/b")" "$(median 3 <"$WORK/b")"
  if [ -n "${LARGE_URI:-}" ]; then
    read -r lratio lspread < <(paired "$f" "$WORK/c" "$WORK/b")
    printf '  %s: best %s %s, paired %s (rounds %s), CPU %.0f%% (fio %.0f%%)\n' "$LARGE_KEYS" \
      "$(best $f <"$WORK/c")" "$unit" "$lratio" "$lspread" "$(median 4 <"$WORK/c")" "$(median 3 <"$WORK/c")"
  fi
done
echo "target (fs-core export): >= 0.5x the memory export at 4K and at 1 MiB"
if [ -n "${MEM_4K_WRITE_IOPS:-}" ]; then
  # The export's engine alone, in process (no sockets, channels or wakes): its cost per 4 KiB
  # random write is what one engine thread can serve at most, whatever the network side does.
  echo "fs-core engine alone, in process, the export's defaults (4K random writes, 32 in flight):"
  cargo build --release -q -p nbd-server --example fscore_engine
  "$(release_dir)/examples/fscore_engine" --size-mib "$(( $(numfmt --from=iec "$SIZE") >> 20 ))" \
    --rounds 3 ${BENCH_FSCORE_KEYS:+--key "$BENCH_FSCORE_KEYS"} | tee "$WORK/engine"
  python3 - "$WORK/engine" "$MEM_4K_WRITE_IOPS" <<'PY'
import re, sys
rates = [float(m.group(1)) for m in re.finditer(r": (\d+) writes/s", open(sys.argv[1]).read())]
mem = float(sys.argv[2])
print(f"  best round {max(rates):.0f} writes/s at 100% of one core = {max(rates) / mem:.2f}x the memory"
      f" export's median {mem:.0f} IOPS: the served export's ceiling before any request is read or answered")
PY
fi
if [ -n "${LARGE_URI:-}" ]; then
  echo "(the line under each fs-core job: the same export with a page cache as large as it)"
fi
echo "targets: >= 1.25x IOPS at 4K, >= 1.00x bandwidth at 1 MiB (one connection; 'x4': 4 connections, no target)"
echo "('disk': the export behind the emulated disk, volatile cache, no recording; no target)"
echo "(fio near 100% of its core: the client, not the server, sets the rate)"
