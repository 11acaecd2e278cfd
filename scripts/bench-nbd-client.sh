#!/usr/bin/env bash
# What one request costs the client (fio's nbd engine, libnbd), against nbd-server and against
# `nbdkit memory`, in the same run. `make bench-nbd` shows fio at ~98% of its core at 4K: the
# client sets the rate, and a server can only go faster by making the client's work per
# request cheaper. This prints, per request, for 4K random writes and reads at iodepth 32:
#   - fio's system calls (poll, sendto, recvfrom) and context switches (perf stat, counted in
#     fio's process only);
#   - TCP segments on loopback, both directions (nstat; the whole machine, so keep it quiet);
#   - fio's CPU time per request (fio's usr_cpu + sys_cpu over its IOPS), in microseconds.
# Needs perf and nstat (linux-perf, iproute2) besides fio and nbdkit; run as root.
# Env: BENCH_SECONDS (default 4) per run, BENCH_ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-4}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=1G
BENCH_NAME=bench-nbd-client TOOLS="fio nbdkit perf nstat python3"
# shellcheck source=scripts/bench-servers.sh
source scripts/bench-servers.sh

EVENTS=context-switches,syscalls:sys_enter_poll,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom
measure() { # uri rw -> one line of per-request figures
  nstat -n >/dev/null
  perf stat -x, -e "$EVENTS" -o "$WORK/perf.csv" \
    fio --name=j --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 --size=1G \
        --time_based --runtime="$SECS" --output-format=json --output="$WORK/fio.json" >/dev/null
  nstat TcpInSegs >"$WORK/nstat.txt"
  python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
j = json.load(open(f"{w}/fio.json"))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
n = side["total_ios"]
c = {}
for line in open(f"{w}/perf.csv"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].isdigit():
        c[f[2].replace("syscalls:sys_enter_", "")] = int(f[0])
segs = 0
for line in open(f"{w}/nstat.txt"):
    f = line.split()
    if f and f[0] == "TcpInSegs":
        segs = int(f[1])
cpu_us = (j["usr_cpu"] + j["sys_cpu"]) / 100 / side["iops"] * 1e6
print(f'{side["iops"]:.0f} {c.get("poll", 0) / n:.2f} {c.get("sendto", 0) / n:.2f} '
      f'{c.get("recvfrom", 0) / n:.2f} {c.get("context-switches", 0) / n:.3f} {segs / n:.2f} {cpu_us:.2f}')
PY
}

echo "bench-nbd-client: fio 4K iodepth 32, $SECS s per run, $ROUNDS rounds; per request, medians"
printf '%-10s %-13s %8s %6s %6s %8s %8s %8s %10s\n' job server IOPS poll sendto recvfrom ctxsw tcp-segs fio-us/req
for rw in randwrite randread; do
  : >"$WORK/a"; : >"$WORK/b"
  for _ in $(seq 1 "$ROUNDS"); do
    measure "$OURS_URI" "$rw" >>"$WORK/a"
    measure "$KIT_URI" "$rw" >>"$WORK/b"
  done
  for s in a b; do
    name=nbd-server; [ "$s" = b ] && name=nbdkit-memory
    python3 - "$WORK/$s" "$rw" "$name" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
m = [statistics.median(col) for col in zip(*rows)]
print(f"{sys.argv[2]:<10} {sys.argv[3]:<13} {m[0]:8.0f} {m[1]:6.2f} {m[2]:6.2f} {m[3]:8.2f} {m[4]:8.3f} {m[5]:8.2f} {m[6]:10.2f}")
PY
  done
done
echo "(ctxsw near 0: fio never waits for the server; fio-us/req is what sets the IOPS)"
