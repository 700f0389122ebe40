#!/usr/bin/env bash
# benches/tls.sh -- TLS: nbnet (1 worker, upper plugin, TLS listener) against
# the tokio peer in its TLS mode (tokio-rustls, same rustls + ring provider),
# and against HAProxy terminating TLS in front of plaintext nbnet.
#
#   benches/tls.sh [--duration 3s] [--repeats N] [--quota PERCENT] [--only rps|handshakes]
#   benches/tls.sh --paired PAIRS [--duration 2s] [--quota PERCENT]
#
# Servers run on core 0, the load generator (`nbnet bench --tls`, 1 thread,
# or `openssl s_time` for handshakes) on core 1. Per scenario and server:
# requests/s, and server CPU per response (utime+stime of the server's
# processes -- for HAProxy+nbnet both of them -- over the measured window).
# The two cores are shared with other work: the CPU per response is the
# figure that does not depend on who else runs; requests/s does.
#
# Handshakes: `openssl s_time -new` (full, TLS 1.3) and `-reuse -tls1_2`
# (resumed: s_time does not resume TLS 1.3 sessions -- nbnet's
# nbnet_tls_resumed_total stays 0 -- but does resume TLS 1.2 ones) for the
# duration: connections/s and server CPU per handshake.
#
# --quota 50: the server (nbnet's master and worker; the peer; HAProxy and
# nbnet together) runs in a cgroup (v1 cpu controller) limited to that
# share of one core, so the server, not the load generator, sets the pace
# and requests/s compare servers. Needs root and /sys/fs/cgroup/cpu.
# (One openssl s_time process makes about 1,000 full handshakes/s here:
# to make the server set the handshake rate, give it less, e.g. 15 %.)
#
# --paired PAIRS: requests only, nbnet against the peer (no HAProxy), both
# servers started once and kept running; per scenario, PAIRS back-to-back
# pairs of runs in alternating order, and the median of the per-pair ratios
# with its spread. On a shared VM whose speed drifts by +-20 % from one
# minute to the next, pairs taken seconds apart compare the servers where
# medians of separate runs cannot.
#
# Only 127.0.0.1 is used. Output: a markdown table on stdout, raw data in $OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DUR=3s REPEATS=1 QUOTA="" ONLY="" PAIRS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DUR=$2; shift ;;
        --repeats) REPEATS=$2; shift ;;
        --quota) QUOTA=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --paired) PAIRS=$2; shift ;;
        *) echo "usage: $0 [--duration 3s] [--repeats N] [--quota PERCENT] [--only rps|handshakes] [--paired PAIRS]" >&2; exit 2 ;;
    esac
    shift
done
DUR_S=${DUR%s}
NB_PORT=${NB_PORT:-19500}      # nbnet, TLS
PLAIN_PORT=${PLAIN_PORT:-19501} # nbnet, plaintext (HAProxy's backend, and the readiness probe)
PEER_PORT=${PEER_PORT:-19502}  # tokio peer, TLS
HAP_PORT=${HAP_PORT:-19503}    # HAProxy, TLS
OUT=${OUT:-$(mktemp -d /tmp/nbnet-tls.XXXXXX)}
mkdir -p "$OUT"
CLK_TCK=$(getconf CLK_TCK)
log() { echo "tls: $*" >&2; }

log "building (release): nbnet, upper plugin, tokio-peer"
cargo build --release -q -p nbnet -p upper -p tokio-peer
NBNET=$ROOT/target/release/nbnet
PEER=$ROOT/target/release/tokio-peer

# A P-256 CA and server certificate for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$OUT/ca.key" -out "$OUT/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$OUT/ext.cnf"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days 2 -extfile "$OUT/ext.cnf" -out "$OUT/server.pem" 2>/dev/null
cat "$OUT/server.pem" "$OUT/server.key" >"$OUT/haproxy.pem"

cat >"$OUT/nbnet.toml" <<EOF
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
addr = "127.0.0.1:$PLAIN_PORT"
plugin = "upper"
[[listeners]]
addr = "127.0.0.1:$NB_PORT"
plugin = "upper"
tls = { cert = "$OUT/server.pem", key = "$OUT/server.key" }
EOF

cat >"$OUT/haproxy.cfg" <<EOF
global
    nbthread 1
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend tls
    bind 127.0.0.1:$HAP_PORT ssl crt $OUT/haproxy.pem
    default_backend nbnet
backend nbnet
    server nb 127.0.0.1:$PLAIN_PORT
EOF

PIDS=()     # processes whose CPU counts (nbnet's worker, the peer, haproxy)
TOPS=()     # what we signal to stop
CG=""       # the servers' cgroup with --quota
if [ -n "$QUOTA" ]; then
    CG=/sys/fs/cgroup/cpu/nbnet-tls-bench-$$
    mkdir "$CG"
    echo 100000 >"$CG/cpu.cfs_period_us"
    echo $((QUOTA * 1000)) >"$CG/cpu.cfs_quota_us"
    log "servers limited to $QUOTA % of one core ($CG)"
fi
KEEP=()     # --paired: servers started earlier, also stopped at the end
cleanup() {
    for p in "${TOPS[@]}" "${KEEP[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "$CG" ]; then
        for p in "${TOPS[@]}" "${KEEP[@]}"; do wait "$p" 2>/dev/null || true; done
        rmdir "$CG" 2>/dev/null || true
    fi
}
trap cleanup EXIT
# Put before a server's command: it joins the quota's cgroup, then execs
# (same pid, so $! is the server; whatever it forks is in the cgroup too).
CAPPED=()
if [ -n "$CG" ]; then
    CAPPED=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG")
fi

wait_plain() {
    local i
    for ((i = 0; i < 100; i++)); do
        if "$NBNET" send "127.0.0.1:$1" ping --timeout 1s >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "no answer on port $1"; return 1
}
wait_tls() {
    local i
    for ((i = 0; i < 100; i++)); do
        if "$NBNET" send --tls --insecure "127.0.0.1:$1" ping --timeout 1s >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "no TLS answer on port $1"; return 1
}

start() { # nbnet|peer|haproxy -> sets PIDS, TOPS, PORT
    PIDS=() TOPS=()
    case "$1" in
        nbnet | haproxy)
            NBNET_ALLOW_ROOT=1 "${CAPPED[@]}" taskset -c 0 "$NBNET" --config "$OUT/nbnet.toml" 2>>"$OUT/nbnet.log" &
            TOPS+=($!)
            wait_plain "$PLAIN_PORT"
            PIDS+=("$(awk '{print $1}' "/proc/${TOPS[0]}/task/${TOPS[0]}/children")")
            PORT=$NB_PORT
            if [ "$1" = haproxy ]; then
                "${CAPPED[@]}" taskset -c 0 haproxy -db -f "$OUT/haproxy.cfg" 2>>"$OUT/haproxy.log" &
                TOPS+=($!) PIDS+=($!)
                PORT=$HAP_PORT
            fi
            ;;
        peer)
            "${CAPPED[@]}" taskset -c 0 "$PEER" --addr "127.0.0.1:$PEER_PORT" --tls-cert "$OUT/server.pem" \
                --tls-key "$OUT/server.key" 2>>"$OUT/peer.log" &
            TOPS+=($!) PIDS+=($!)
            PORT=$PEER_PORT
            ;;
    esac
    wait_tls "$PORT"
}
stop() { for p in "${TOPS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; TOPS=(); }
ticks() { local t=0 p; for p in "${PIDS[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

RESULTS=$OUT/results.jsonl
: >"$RESULTS"
bench() { taskset -c 1 "$NBNET" bench --tls --ca "$OUT/ca.pem" --addr "127.0.0.1:$PORT" --expect upper --threads 1 "$@"; }

SCENARIOS=("d1-64 50 1 64" "d16-64 50 16 64" "d1-64k 8 1 65536" "d16-64k 8 16 65536")

if [ -n "$PAIRS" ]; then
    start nbnet
    NB_PID=${PIDS[0]} KEEP=("${TOPS[@]}")
    start peer
    PEER_PID=${PIDS[0]}
    one() { # server pid port scenario conns depth size -> a JSON line in $RESULTS
        local t0 t1 json
        PORT=$3 PIDS=("$2")
        t0=$(ticks)
        json=$(bench --conns "$5" --pipeline "$6" --size "$7" --duration "$DUR" --warmup 0s --json)
        t1=$(ticks)
        python3 - "$1" "$4" "$t0" "$t1" "$CLK_TCK" "$json" >>"$RESULTS" <<'PY'
import json, sys
server, sc, t0, t1, hz, raw = sys.argv[1:]
d = json.loads(raw)
assert d["errors"] + d["mismatches"] == 0, raw
cpu = (float(t1) - float(t0)) / float(hz)
print(json.dumps({"server": server, "scenario": sc, "rps": d["rps"],
                  "cpu_us_per_resp": cpu * 1e6 / max(d["requests"], 1)}))
PY
    }
    for sc in "${SCENARIOS[@]}"; do
        set -- $sc
        log "$1: $PAIRS pairs"
        one warmup "$NB_PID" "$NB_PORT" "$@" && one warmup "$PEER_PID" "$PEER_PORT" "$@"
        for i in $(seq "$PAIRS"); do
            if [ $((i % 2)) = 1 ]; then
                one nbnet "$NB_PID" "$NB_PORT" "$@"; one peer "$PEER_PID" "$PEER_PORT" "$@"
            else
                one peer "$PEER_PID" "$PEER_PORT" "$@"; one nbnet "$NB_PID" "$NB_PORT" "$@"
            fi
        done
    done
    python3 - "$RESULTS" <<'PY' | tee "$OUT/table.md"
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"warmup"' not in l]
print("| scenario | pairs | nbnet/peer req/s: median (quartiles; min–max) | peer/nbnet CPU per response: median | nbnet CPU µs/resp | peer CPU µs/resp |")
print("|---|---:|---|---:|---:|---:|")
for sc in dict.fromkeys(r["scenario"] for r in rows):
    nb = [r for r in rows if r["scenario"] == sc and r["server"] == "nbnet"]
    pe = [r for r in rows if r["scenario"] == sc and r["server"] == "peer"]
    rps = sorted(a["rps"] / b["rps"] for a, b in zip(nb, pe))
    cpu = [b["cpu_us_per_resp"] / a["cpu_us_per_resp"] for a, b in zip(nb, pe)]
    q = statistics.quantiles(rps, n=4) if len(rps) > 1 else [rps[0]] * 3
    med = lambda v: statistics.median(v)
    print(f"| {sc} | {len(rps)} | {med(rps):.2f} ({q[0]:.2f}–{q[2]:.2f}; {rps[0]:.2f}–{rps[-1]:.2f}) | {med(cpu):.2f} "
          f"| {med([a['cpu_us_per_resp'] for a in nb]):.2f} | {med([b['cpu_us_per_resp'] for b in pe]):.2f} |")
PY
    log "raw data: $OUT"
    exit 0
fi

for rep in $(seq "$REPEATS"); do
    for sc in "${SCENARIOS[@]}"; do
        if [ "$ONLY" = handshakes ]; then continue; fi
        set -- $sc
        for server in nbnet peer haproxy; do
            start "$server"
            bench --conns "$2" --pipeline "$3" --size "$4" --duration 1s --warmup 0s --json >/dev/null
            t0=$(ticks)
            json=$(bench --conns "$2" --pipeline "$3" --size "$4" --duration "$DUR" --warmup 0s --json)
            t1=$(ticks)
            stop
            python3 - "$server" "$1" "$t0" "$t1" "$CLK_TCK" "$json" >>"$RESULTS" <<'PY'
import json, sys
server, sc, t0, t1, hz, raw = sys.argv[1:]
d = json.loads(raw)
cpu = (float(t1) - float(t0)) / float(hz)
print(json.dumps({"kind": "rps", "server": server, "scenario": sc, "rps": d["rps"],
                  "cpu_us_per_resp": cpu * 1e6 / max(d["requests"], 1),
                  "errors": d["errors"] + d["mismatches"], "client_cores": d["client_cpu_cores"]}))
PY
            log "$(tail -n1 "$RESULTS")"
        done
    done
    for mode in new reuse; do
        if [ "$ONLY" = rps ]; then continue; fi
        for server in nbnet peer; do
            start "$server"
            t0=$(ticks)
            extra=()
            if [ "$mode" = reuse ]; then extra=(-tls1_2); fi
            out=$(taskset -c 1 openssl s_time -connect "127.0.0.1:$PORT" "-$mode" "${extra[@]}" -time "$DUR_S" 2>&1 || true)
            t1=$(ticks)
            stop
            conns=$(echo "$out" | awk '/connections in [0-9]+ real seconds/ {print $1; exit}')
            secs=$(echo "$out" | awk '/connections in [0-9]+ real seconds/ {print $4; exit}')
            python3 - "$server" "$mode" "$t0" "$t1" "$CLK_TCK" "${conns:-0}" "${secs:-1}" >>"$RESULTS" <<'PY'
import json, sys
server, mode, t0, t1, hz, conns, secs = sys.argv[1:]
cpu = (float(t1) - float(t0)) / float(hz)
n = max(int(conns), 1)
print(json.dumps({"kind": "handshakes", "server": server, "scenario": "hs-" + mode,
                  "rps": int(conns) / float(secs), "cpu_us_per_resp": cpu * 1e6 / n}))
PY
            log "$(tail -n1 "$RESULTS")"
        done
    done
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/table.md"
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["scenario"], r["server"]), []).append(r)
scs = []
for r in rows:
    if r["scenario"] not in scs:
        scs.append(r["scenario"])
med = lambda k, s, f: statistics.median(x[f] for x in by[(s, k)]) if (s, k) in by else None
print("| scenario | nbnet req/s | peer req/s | nbnet/peer | nbnet CPU µs/resp | peer CPU µs/resp | HAProxy+nbnet CPU µs/resp | nbnet/(HAProxy+nbnet) CPU |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for s in scs:
    n, p, h = med("nbnet", s, "rps"), med("peer", s, "rps"), med("haproxy", s, "rps")
    nc, pc, hc = med("nbnet", s, "cpu_us_per_resp"), med("peer", s, "cpu_us_per_resp"), med("haproxy", s, "cpu_us_per_resp")
    f = lambda v, d=0: "—" if v is None else f"{v:,.{d}f}"
    print(f"| {s} | {f(n)} | {f(p)} | {f(n / p if n and p else None, 2)} | {f(nc, 2)} | {f(pc, 2)} | {f(hc, 2)} | {f(nc / hc if nc and hc else None, 2)} |")
PY
log "raw data: $OUT"
