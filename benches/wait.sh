#!/usr/bin/env bash
# benches/wait.sh -- plugins that wait (issue 12): thread-pool offload,
# deferred answers, the inline listener beside a saturated pool, and
# redis-cache next to redis-benchmark on the same Redis.
#
#   benches/wait.sh [--duration SECONDS] [--only offload|deferred|isolation|redis]...
#
# Every server (nbnet, redis-server) runs on core 0, every load generator
# (`nbnet bench`, redis-benchmark) on core 1. The machine's load average is
# printed before and after each scenario (other work on a shared machine
# moves the timed figures; the CPU-per-request figures count work).
# Only 127.0.0.1 is used. Output: one line per figure on stdout; logs in $OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DUR=5 ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DUR=$2; shift ;;
        --only) ONLY+=("$2"); shift ;;
        *) echo "usage: $0 [--duration SECONDS] [--only offload|deferred|isolation|redis]..." >&2; exit 2 ;;
    esac
    shift
done
want() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

OUT=${OUT:-$(mktemp -d /tmp/nbnet-wait.XXXXXX)}
mkdir -p "$OUT"
PORT=${PORT:-19300} PORT2=${PORT2:-19301} REDIS_PORT=${REDIS_PORT:-19302}
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log() { echo "wait: $*" >&2; }
load() { echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"; }

log "building (release): nbnet, redis-cache, defer-rs, upper; misbehave (C)"
cargo build --release -q -p nbnet -p redis-cache -p defer_rs -p upper
NBNET=$ROOT/target/release/nbnet
REL=$ROOT/target/release
cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden -I plugin-api/include \
    -o "$OUT/libmisbehave.so" plugins/testing/c/misbehave.c

TOP_PID="" WORKER=""
start_nbnet() { # config text
    printf '%s\n' "$1" >"$OUT/nbnet.toml"
    NBNET_ALLOW_ROOT=1 taskset -c 0 "$NBNET" --config "$OUT/nbnet.toml" 2>>"$OUT/nbnet.log" &
    TOP_PID=$!
    local i
    for ((i = 0; i < 600; i++)); do
        if "$NBNET" send "127.0.0.1:$PORT" "ping" --timeout 1s >/dev/null 2>&1 \
            || "$NBNET" send "127.0.0.1:$PORT" "GET ping" --timeout 1s >/dev/null 2>&1; then
            break
        fi
        sleep 0.1
    done
    WORKER=$(awk '{print $1}' "/proc/$TOP_PID/task/$TOP_PID/children")
}
stop_nbnet() {
    kill -TERM "$TOP_PID" 2>/dev/null || true
    wait "$TOP_PID" 2>/dev/null || true
    TOP_PID=""
}
trap 'if [ -n "$TOP_PID" ]; then kill -TERM "$TOP_PID" 2>/dev/null || true; fi; if [ -n "${REDIS_PID:-}" ]; then kill "$REDIS_PID" 2>/dev/null || true; fi' EXIT
bench() { # port args... (pinned to core 1)
    local port=$1; shift
    taskset -c 1 "$NBNET" bench --addr "127.0.0.1:$port" --threads 1 --json "$@"
}
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

server_head() { # plugin-table... (after [server])
    cat <<EOF
[server]
workers = 1
read_timeout = "10m"
max_connections = 20000
max_deferred_per_connection = 1024
[log]
level = "warn"
EOF
}

if want offload; then
    log "offload: sleep:1 on threads = 64, 1 worker, 256 connections"
    load
    start_nbnet "$(server_head)
[[plugins]]
name = \"sleep\"
path = \"$OUT/libmisbehave.so\"
threads = 64
[[listeners]]
addr = \"127.0.0.1:$PORT\"
plugin = \"sleep\""
    json=$(bench "$PORT" --conns 256 --prefix "sleep:1 " --size 16 --expect none --duration "$DUR" --warmup 1)
    stop_nbnet
    echo "offload sleep:1 threads=64 conns=256: $(echo "$json" | field "['rps']") req/s (target >= 54400), p99 $(echo "$json" | field "['latency_us']['p99']") us, errors $(echo "$json" | field "['errors']")"
    echo "$json" >"$OUT/offload.json"
    load
fi

if want deferred; then
    log "deferred: server CPU per request, answered at once from the plugin's thread vs inline"
    load
    start_nbnet "$(server_head)
[[plugins]]
name = \"defer\"
path = \"$REL/libdefer_rs.so\"
[[listeners]]
addr = \"127.0.0.1:$PORT\"
plugin = \"defer\""
    N=200000
    # inline: answered in process; handoff: answered in process after the
    # plugin hands a copy to its own thread (its own cost: a channel send
    # and a thread wake-up); later: deferred, answered at once by the
    # plugin's thread. Host cost of deferring = later - handoff.
    for mode in inline handoff later; do
        case $mode in
            inline) prefix="inline " ;;
            handoff) prefix="handoff 0 " ;;
            later) prefix="later 0 " ;;
        esac
        bench "$PORT" --conns 50 --prefix "$prefix" --size 64 --expect none --requests 20000 >/dev/null
        t0=$(ticks "$WORKER") r0=$(ticks "$WORKER/task/$WORKER")
        json=$(bench "$PORT" --conns 50 --prefix "$prefix" --size 64 --expect none --requests "$N" --duration 600)
        t1=$(ticks "$WORKER") r1=$(ticks "$WORKER/task/$WORKER")
        python3 - "$mode" "$t0" "$t1" "$r0" "$r1" "$CLK_TCK" "$N" "$json" <<'PY'
import json, sys
mode, t0, t1, r0, r1, hz, n, raw = sys.argv[1:]
d = json.loads(raw)
per = lambda a, b: (float(b) - float(a)) / float(hz) / int(n) * 1e6
print(f"deferred {mode:7}: worker CPU {per(t0, t1):.2f} us/request (reactor thread {per(r0, r1):.2f}), "
      f"{d['rps']:.0f} req/s, p99 {d['latency_us']['p99']} us, errors {d['errors']}")
PY
    done
    stop_nbnet
    load
fi

if want isolation; then
    log "isolation: upper inline beside a saturated threads = 32 sleep:1 pool, same worker"
    load
    start_nbnet "$(server_head)
[[plugins]]
name = \"sleep\"
path = \"$OUT/libmisbehave.so\"
threads = 32
[[plugins]]
name = \"fast\"
path = \"$REL/libupper.so\"
[[listeners]]
addr = \"127.0.0.1:$PORT2\"
plugin = \"sleep\"
[[listeners]]
addr = \"127.0.0.1:$PORT\"
plugin = \"fast\""
    alone=$(bench "$PORT" --conns 10 --size 64 --expect upper --duration "$DUR" --warmup 1)
    bench "$PORT2" --conns 256 --prefix "sleep:1 " --size 16 --expect none --duration $((DUR + 4)) --warmup 0 >"$OUT/slow.json" &
    slow=$!
    sleep 2
    busy=$(bench "$PORT" --conns 10 --size 64 --expect upper --duration "$DUR" --warmup 0)
    wait "$slow"
    stop_nbnet
    echo "isolation: fast listener (10 conns, depth 1) p99 alone $(echo "$alone" | field "['latency_us']['p99']") us, beside the saturated pool $(echo "$busy" | field "['latency_us']['p99']") us (target <= 2000); slow listener $(field "['rps']" <"$OUT/slow.json") req/s"
    load
fi

if want redis; then
    log "redis: redis-cache (threads = 16) vs redis-benchmark GET, same redis-server"
    load
    mkdir -p "$OUT/redis"
    taskset -c 0 redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$OUT/redis" >"$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    sleep 0.5
    redis-cli -p "$REDIS_PORT" set bench:key xyz >/dev/null
    rb=$(taskset -c 1 redis-benchmark -p "$REDIS_PORT" -t get -c 50 -n 200000 -d 3 --csv | tail -n1)
    echo "redis-benchmark GET (50 clients, depth 1): $rb  (rps,avg,min,p50,p95,p99,max in ms)"
    start_nbnet "$(server_head)
[[plugins]]
name = \"cache\"
path = \"$REL/libredis_cache.so\"
threads = 16
config = { url = \"redis://127.0.0.1:$REDIS_PORT/0\" }
[[listeners]]
addr = \"127.0.0.1:$PORT\"
plugin = \"cache\""
    json=$(bench "$PORT" --conns 50 --prefix "GET bench:" --size 8 --expect none --duration "$DUR" --warmup 1)
    stop_nbnet
    kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=""
    echo "redis-cache GET through nbnet (50 conns, depth 1): $(echo "$json" | field "['rps']") req/s, p50 $(echo "$json" | field "['latency_us']['p50']") us, p99 $(echo "$json" | field "['latency_us']['p99']") us, errors $(echo "$json" | field "['errors']")"
    load
fi
log "logs: $OUT"
