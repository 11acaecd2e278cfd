# Sourced by the nbd benchmarks: builds nbd-server, starts it (memory export "bench") and
# `nbdkit memory`, both of $SIZE bytes on free loopback ports, and fills both with the same
# sequential 1 MiB write, so that jobs measure a written disk rather than first-touch
# allocation. A plain memory export on a server without --control has no emulated disk in
# front (nothing could observe its cache); with DISK_SERVER=1 a second nbd-server, with a
# control socket, serves the same export behind the emulated disk (volatile cache, no
# recording), for context. With BENCH_BASE_BIN (the path of another nbd-server binary, say
# one built from the commit before a change) that binary serves the same export(s) too, to be
# measured in the same rounds. Sets BIN, WORK (a temp dir), PIDS (server, nbdkit[, server with
# the disk]), P1, P2, OURS_URI, KIT_URI[, DISK_URI][, BASE_PID, BASE_URI[, BASE_DISK_PID,
# BASE_DISK_URI]][, FSCORE_PID, FSCORE_URI with FSCORE_SERVER=1: the export as a file of an
# fs-core volume[, LARGE_PID, LARGE_URI, LARGE_KEYS: the same with a page cache as large as
# the export, unless BENCH_FSCORE_LARGE=0]]; stops the servers and removes WORK on exit. Needs: BENCH_NAME (for
# messages), SIZE and TOOLS (commands to check for), and the repository root as the working
# directory.
for tool in $TOOLS; do
  command -v "$tool" >/dev/null || { echo "$BENCH_NAME: $tool is missing (apt-get install fio nbdkit)"; exit 1; }
done
cargo build --release -q -p nbd-server
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
BIN=$(release_dir)/nbd-server
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port
  for _ in $(seq 1 200); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$BENCH_NAME: nothing listens on port $1"; exit 1
}

P1=$(free_port)
"$BIN" --listen "127.0.0.1:$P1" --export "bench:size=$SIZE" 2>"$WORK/nbd-server.log" &
PIDS+=($!)
P2=$(free_port)
nbdkit --foreground --ipaddr 127.0.0.1 --port "$P2" memory "$SIZE" 2>"$WORK/nbdkit.log" &
PIDS+=($!)
wait_port "$P1"; wait_port "$P2"
OURS_URI="nbd://127.0.0.1:$P1/bench"
KIT_URI="nbd://127.0.0.1:$P2/"
URIS=("$OURS_URI" "$KIT_URI")
if [ "${DISK_SERVER:-0}" = 1 ]; then
  P3=$(free_port)
  "$BIN" --listen "127.0.0.1:$P3" --export "bench:size=$SIZE" --control "$WORK/ctl" \
    2>"$WORK/nbd-server-disk.log" &
  PIDS+=($!)
  wait_port "$P3"
  DISK_URI="nbd://127.0.0.1:$P3/bench"
  URIS+=("$DISK_URI")
fi
# start_fscore KEYS LOG: nbd-server with the export "bench" as a file of an fs-core volume in
# memory (the iomap model under it), with KEYS (may be empty) and BENCH_FSCORE_KEYS, on a free
# port, stderr to $WORK/LOG; sets STARTED_PID and STARTED_URI.
start_fscore() {
  local port
  port=$(free_port)
  "$BIN" --listen "127.0.0.1:$port" \
    --export "bench:size=$SIZE,fscore=mem${1:+,$1}${BENCH_FSCORE_KEYS:+,$BENCH_FSCORE_KEYS}" \
    ${BENCH_FSCORE_WORKERS:+--workers "$BENCH_FSCORE_WORKERS"} 2>"$WORK/$2" &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
  wait_port "$port"
  STARTED_URI="nbd://127.0.0.1:$port/bench"
  URIS+=("$STARTED_URI")
}
if [ "${FSCORE_SERVER:-0}" = 1 ]; then
  start_fscore "" nbd-server-fscore.log
  FSCORE_PID=$STARTED_PID FSCORE_URI=$STARTED_URI
  # And with a page cache as large as the export (what the kernel's page cache is for a file
  # on XFS when memory is free), unless BENCH_FSCORE_LARGE=0.
  if [ "${BENCH_FSCORE_LARGE:-1}" = 1 ]; then
    LARGE_KEYS="cache-folios=$(( $(numfmt --from=iec "$SIZE") / 4096 ))"
    start_fscore "$LARGE_KEYS" nbd-server-fscore-large.log
    LARGE_PID=$STARTED_PID LARGE_URI=$STARTED_URI
  fi
fi
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  [ -x "$BENCH_BASE_BIN" ] || { echo "$BENCH_NAME: BENCH_BASE_BIN=$BENCH_BASE_BIN is not an executable"; exit 1; }
  P4=$(free_port)
  "$BENCH_BASE_BIN" --listen "127.0.0.1:$P4" --export "bench:size=$SIZE" 2>"$WORK/base.log" &
  BASE_PID=$!
  PIDS+=("$BASE_PID")
  wait_port "$P4"
  BASE_URI="nbd://127.0.0.1:$P4/bench"
  URIS+=("$BASE_URI")
  if [ "${DISK_SERVER:-0}" = 1 ]; then
    P5=$(free_port)
    "$BENCH_BASE_BIN" --listen "127.0.0.1:$P5" --export "bench:size=$SIZE" \
      --control "$WORK/base-ctl" 2>"$WORK/base-disk.log" &
    BASE_DISK_PID=$!
    PIDS+=("$BASE_DISK_PID")
    wait_port "$P5"
    BASE_DISK_URI="nbd://127.0.0.1:$P5/bench"
    URIS+=("$BASE_DISK_URI")
  fi
fi
for uri in "${URIS[@]}"; do
  fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size="$SIZE" \
      --output="$WORK/prefill.txt" >/dev/null
done
