#!/usr/bin/env bash
# benches/compare.sh -- nbnet (1 worker, upper plugin) against the tokio peer
# (benches/tokio-peer), same machine, same run, interleaved.
#
#   benches/compare.sh [--quick] [--repeats N] [--skip-timed] [--skip-strace] [--skip-callgrind] [--skip-idle]
#
# The server runs on core 0, the load generator (`nbnet bench`, 1 thread) on
# core 1. Scenarios: (a) 64 B, 50 conns, depth 1; (b) 64 B, 50 conns, depth 16;
# (c) 64 KiB, 8 conns; (d) 64 B, 1000 conns; (e) RSS per idle connection at
# 10 000 idle connections. Every timed scenario runs REPEATS times, nbnet and
# the peer alternating, each on a freshly started server after a warm-up run;
# the table shows medians. Then, once per server: syscalls per response
# (strace -c -f on the server during a fixed-count run) and user-space
# instructions per response (callgrind, difference of two fixed-count runs so
# start-up cancels) for (a) and (b).
#
# Only 127.0.0.1 is used. Output: the table on stdout; raw data, logs,
# strace tables and callgrind profiles in $OUT (default: a new /tmp folder).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

QUICK=0 REPEATS="" DO_TIMED=1 DO_STRACE=1 DO_CALLGRIND=1 DO_IDLE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --repeats) REPEATS=$2; shift ;;
        --skip-timed) DO_TIMED=0 ;;
        --skip-strace) DO_STRACE=0 ;;
        --skip-callgrind) DO_CALLGRIND=0 ;;
        --skip-idle) DO_IDLE=0 ;;
        *) echo "usage: $0 [--quick] [--repeats N] [--skip-timed] [--skip-strace] [--skip-callgrind] [--skip-idle]" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    : "${REPEATS:=3}"; DUR=2s; WARM=1s; CG_N1=4000; CG_N2=20000; ST_N=100000; IDLE=10000
else
    : "${REPEATS:=5}"; DUR=8s; WARM=2s; CG_N1=10000; CG_N2=60000; ST_N=300000; IDLE=10000
fi
PEER_THREADS=${PEER_THREADS:-1}
NB_PORT=${NB_PORT:-19200}
PEER_PORT=${PEER_PORT:-19201}
OUT=${OUT:-$(mktemp -d /tmp/nbnet-compare.XXXXXX)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { echo "compare: $*" >&2; }

log "building (release): nbnet, upper plugin, tokio-peer"
cargo build --release -q -p nbnet -p upper -p tokio-peer
NBNET=$ROOT/target/release/nbnet
PEER=$ROOT/target/release/tokio-peer

cat > "$OUT/nbnet.toml" <<EOF
[server]
workers = 1
read_timeout = "10m"
max_connections = 20000
[log]
level = "warn"
[[plugins]]
name = "upper"
path = "$ROOT/target/release/libupper.so"
[[listeners]]
addr = "127.0.0.1:$NB_PORT"
plugin = "upper"
EOF

SERVER_PID=""   # the process doing the work: nbnet's worker, or the peer
TOP_PID=""      # what we signal to stop: nbnet's master, or the peer

wait_ready() { # port timeout_s
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if "$NBNET" send "127.0.0.1:$1" ping --timeout 1s >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "server on port $1 did not answer within $2 s (see $OUT/*.log)"; return 1
}

start_server() { # nbnet|peer [wrapper...]
    local which=$1; shift
    if [ "$which" = nbnet ]; then
        # (A benchmark box is often run as root: nbnet refuses to run its
        # plugins as root unless told; the benchmark's plugins are ours.)
        NBNET_ALLOW_ROOT=1 taskset -c 0 "$@" "$NBNET" --config "$OUT/nbnet.toml" 2>>"$OUT/nbnet.log" &
        TOP_PID=$!
        wait_ready "$NB_PORT" 120
        SERVER_PID=$(awk '{print $1}' "/proc/$TOP_PID/task/$TOP_PID/children")
    else
        taskset -c 0 "$@" "$PEER" --addr "127.0.0.1:$PEER_PORT" --threads "$PEER_THREADS" 2>>"$OUT/peer.log" &
        TOP_PID=$!
        wait_ready "$PEER_PORT" 120
        SERVER_PID=$TOP_PID
    fi
}

stop_server() {
    kill -TERM "$TOP_PID" 2>/dev/null || true
    wait "$TOP_PID" 2>/dev/null || true
    TOP_PID="" SERVER_PID=""
}
trap 'if [ -n "$TOP_PID" ]; then kill -TERM "$TOP_PID" 2>/dev/null || true; fi' EXIT

port_of() { if [ "$1" = nbnet ]; then echo "$NB_PORT"; else echo "$PEER_PORT"; fi; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# All CPUs' busy time (user+nice+system+irq+softirq; processes are charged
# for the softirq work they trigger, so it belongs in the total), in ticks:
# with the server's and the client's own time subtracted, what other
# processes took. Tick accounting makes it approximate (about +-0.1 core).
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

bench() { # port args... (load generator pinned to core 1)
    local port=$1; shift
    taskset -c 1 "$NBNET" bench --addr "127.0.0.1:$port" --expect upper --threads 1 "$@"
}

# name conns depth size
SCENARIOS=("a 50 1 64" "b 50 16 64" "c 8 1 65536" "d 1000 1 64")

run_timed() { # server scenario conns depth size repeat
    local server=$1 sc=$2 conns=$3 depth=$4 size=$5 rep=$6 port t0 t1 json
    port=$(port_of "$server")
    start_server "$server"
    bench "$port" --conns "$conns" --pipeline "$depth" --size "$size" --duration "$WARM" --warmup 0s --json >/dev/null
    t0=$(ticks "$SERVER_PID") b0=$(busy_ticks)
    json=$(bench "$port" --conns "$conns" --pipeline "$depth" --size "$size" --duration "$DUR" --warmup 0s --json)
    t1=$(ticks "$SERVER_PID") b1=$(busy_ticks)
    stop_server
    python3 - "$server" "$sc" "$rep" "$t0" "$t1" "$CLK_TCK" "$json" "$b0" "$b1" >>"$RESULTS" <<'PY'
import json, sys
server, sc, rep, t0, t1, hz, raw, b0, b1 = sys.argv[1:]
d = json.loads(raw)
cpu_s = (float(t1) - float(t0)) / float(hz)
# Others' CPU over the run, in cores: a repeat where other processes used the
# machine (a build, a test suite) is flagged and left out of the medians.
others = ((float(b1) - float(b0)) / float(hz) - cpu_s - d["client_cpu_s"]) / max(d["elapsed_s"], 1e-9)
print(json.dumps({"kind": "timed", "server": server, "scenario": sc, "repeat": int(rep),
                  "rps": d["rps"], "bytes_per_s": d["bytes_per_s"], "p99_us": d["latency_us"]["p99"],
                  "p50_us": d["latency_us"]["p50"], "max_us": d["latency_us"]["max"],
                  "requests": d["requests"], "server_cpu_s": cpu_s,
                  "cpu_us_per_resp": cpu_s * 1e6 / max(d["requests"], 1),
                  "client_cpu_cores": d["client_cpu_cores"],
                  "per_conn_min": d["per_conn"]["min"], "per_conn_max": d["per_conn"]["max"],
                  "starved": d["per_conn"]["starved"], "longest_stall_ms": d["per_conn"]["longest_stall_ms"],
                  "errors": d["errors"] + d["mismatches"], "others_cores": others}))
PY
    log "$(tail -n1 "$RESULTS")"
}

for ((rep = 1; DO_TIMED && rep <= REPEATS; rep++)); do
    for s in "${SCENARIOS[@]}"; do
        set -- $s
        # Alternate which server goes first, so drift does not favour one.
        if ((rep % 2)); then order="nbnet peer"; else order="peer nbnet"; fi
        for server in $order; do
            run_timed "$server" "$1" "$2" "$3" "$4" "$rep"
        done
    done
done

if [ "$DO_IDLE" = 1 ]; then
    for server in nbnet peer; do
        port=$(port_of "$server")
        start_server "$server"
        sleep 0.5
        before=$(rss_kib "$SERVER_PID")
        # Not through bench(): $! must be the load generator itself (taskset execs it).
        taskset -c 1 "$NBNET" bench --addr "127.0.0.1:$port" --expect upper --idle --conns "$IDLE" \
            --duration 600s >"$OUT/idle-$server.out" 2>&1 &
        idle_pid=$!
        for ((i = 0; i < 1200; i++)); do
            grep -q '^ready' "$OUT/idle-$server.out" 2>/dev/null && break
            kill -0 "$idle_pid" 2>/dev/null || break
            sleep 0.1
        done
        sleep 1
        after=$(rss_kib "$SERVER_PID")
        ready=$(grep -c '^ready' "$OUT/idle-$server.out" || true)
        kill "$idle_pid" 2>/dev/null || true
        wait "$idle_pid" 2>/dev/null || true
        stop_server
        echo "{\"kind\": \"idle\", \"server\": \"$server\", \"conns\": $IDLE, \"ready\": $ready, \"rss_before_kib\": $before, \"rss_after_kib\": $after}" >>"$RESULTS"
        log "$(tail -n1 "$RESULTS")"
    done
fi

if [ "$DO_STRACE" = 1 ]; then
    command -v strace >/dev/null || { log "strace missing: apt-get update && apt-get install -y strace"; exit 1; }
    for s in "a 50 1 64" "b 50 16 64"; do
        set -- $s
        for server in nbnet peer; do
            port=$(port_of "$server")
            start_server "$server"
            bench "$port" --conns "$2" --pipeline "$3" --size "$4" --duration "$WARM" --warmup 0s --json >/dev/null
            strace -c -f -p "$SERVER_PID" -o "$OUT/strace-$server-$1.txt" 2>/dev/null &
            strace_pid=$!
            sleep 1
            json=$(bench "$port" --conns "$2" --pipeline "$3" --size "$4" --requests "$ST_N" --duration 600s --json)
            kill -INT "$strace_pid"; wait "$strace_pid" || true
            stop_server
            python3 - "$server" "$1" "$OUT/strace-$server-$1.txt" "$json" >>"$RESULTS" <<'PY'
import json, sys
server, sc, path, raw = sys.argv[1:]
d = json.loads(raw)
calls, total = {}, 0
for line in open(path):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit():
        name = f[-1]
        n = int(f[3])
        if name == "total":
            total = n
        else:
            calls[name] = n
n = max(d["requests"], 1)
print(json.dumps({"kind": "strace", "server": server, "scenario": sc, "requests": d["requests"],
                  "per_resp": total / n, "by_call": {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}))
PY
            log "$(tail -n1 "$RESULTS")"
        done
    done
fi

if [ "$DO_CALLGRIND" = 1 ]; then
    for s in "a 50 1 64" "b 50 16 64"; do
        set -- $s
        for server in nbnet peer; do
            for n in "$CG_N1" "$CG_N2"; do
                port=$(port_of "$server")
                rm -f "$OUT"/cg-"$server"-"$1"-"$n".*
                start_server "$server" valgrind --tool=callgrind --trace-children=yes \
                    --callgrind-out-file="$OUT/cg-$server-$1-$n.%p"
                worker=$SERVER_PID
                bench "$port" --conns "$2" --pipeline "$3" --size "$4" --requests "$n" --duration 600s --json \
                    >"$OUT/cg-$server-$1-$n.json"
                stop_server
                # The worker's (or peer's) file: named after its pid.
                ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$OUT/cg-$server-$1-$n.$worker")
                echo "{\"kind\": \"callgrind\", \"server\": \"$server\", \"scenario\": \"$1\", \"requests\": $n, \"ir\": $ir, \"file\": \"$OUT/cg-$server-$1-$n.$worker\"}" >>"$RESULTS"
                log "$(tail -n1 "$RESULTS")"
            done
        done
    done
fi

python3 "$ROOT/benches/compare_report.py" "$RESULTS" | tee "$OUT/table.md"
log "raw data, logs, strace tables and callgrind profiles: $OUT"
