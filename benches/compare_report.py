#!/usr/bin/env python3
"""Summarise benches/compare.sh's results.jsonl as Markdown tables (medians, ratios, targets)."""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
timed = defaultdict(list)
for r in rows:
    if r["kind"] == "timed":
        timed[(r["server"], r["scenario"])].append(r)

NAMES = {
    "a": "(a) 64 B, 50 conns, depth 1",
    "b": "(b) 64 B, 50 conns, depth 16",
    "c": "(c) 64 KiB, 8 conns, depth 1",
    "d": "(d) 64 B, 1000 conns, depth 1",
}


# A repeat during which other processes used more than this many cores is
# "disturbed"; medians use the undisturbed repeats when each server has >= 2.
DISTURBED = 0.15


def clean(r):
    return r.get("others_cores", 0.0) <= DISTURBED


def used(server, sc):
    rs = timed.get((server, sc), [])
    ok = [r for r in rs if clean(r)]
    other = "peer" if server == "nbnet" else "nbnet"
    ok_other = [r for r in timed.get((other, sc), []) if clean(r)]
    return ok if len(ok) >= 2 and len(ok_other) >= 2 else rs


def med(server, sc, key):
    vals = [r[key] for r in used(server, sc)]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


print("## Timed scenarios (medians; repeats used / run, per server)\n")
for sc in NAMES:
    if ("nbnet", sc) in timed:
        print(f"- {sc}: nbnet {len(used('nbnet', sc))}/{len(timed[('nbnet', sc)])}, "
              f"peer {len(used('peer', sc))}/{len(timed.get(('peer', sc), []))} "
              f"(a repeat during which other processes used > {DISTURBED} cores is left out when >= 2 clean remain)")
print()
print("| scenario | metric | nbnet | peer | nbnet/peer |")
print("|---|---|---:|---:|---:|")
for sc, name in NAMES.items():
    if ("nbnet", sc) not in timed and ("peer", sc) not in timed:
        continue
    metrics = [("req/s", "rps", 0)]
    if sc == "c":
        metrics.append(("MB/s (responses)", "bytes_per_s", 0))
    metrics += [("p99 latency µs", "p99_us", 0), ("server CPU µs / response", "cpu_us_per_resp", 2),
                ("client CPU (cores)", "client_cpu_cores", 2)]
    for label, key, digits in metrics:
        a, b = med("nbnet", sc, key), med("peer", sc, key)
        if key == "bytes_per_s":
            a, b = (a / 1e6 if a else a), (b / 1e6 if b else b)
        print(f"| {name} | {label} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio(a, b)} |")

print("\n## Per repeat: p99 µs, req/s, per-connection min/max responses, longest stall\n")
print("| scenario | server | repeat | req/s | p99 µs | max µs | per-conn min | per-conn max | starved | longest stall ms | errors | others' CPU (cores) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for sc in NAMES:
    for server in ("nbnet", "peer"):
        for r in sorted(timed.get((server, sc), []), key=lambda r: r["repeat"]):
            print(f"| {sc} | {server} | {r['repeat']} | {r['rps']:,.0f} | {r['p99_us']:,.0f} | {r['max_us']:,.0f} "
                  f"| {r['per_conn_min']:,} | {r['per_conn_max']:,} | {r['starved']} | {r['longest_stall_ms']:.1f} | {r['errors']} "
                  f"| {r.get('others_cores', float('nan')):.2f}{'' if clean(r) else ' disturbed'} |")

idle = [r for r in rows if r["kind"] == "idle"]
if idle:
    print("\n## (e) Idle connections: server RSS\n")
    print("| server | idle conns | RSS before KiB | RSS after KiB | bytes per connection |")
    print("|---|---:|---:|---:|---:|")
    for r in idle:
        per = (r["rss_after_kib"] - r["rss_before_kib"]) * 1024 / r["conns"]
        ok = "" if r["ready"] else " (the connections did not all open)"
        print(f"| {r['server']} | {r['conns']:,} | {r['rss_before_kib']:,} | {r['rss_after_kib']:,} | {per:,.0f}{ok} |")

strace = [r for r in rows if r["kind"] == "strace"]
if strace:
    print("\n## Syscalls per response (strace -c -f on the server, fixed-count run; strace slows the server)\n")
    print("| scenario | server | requests | syscalls / response | breakdown per response |")
    print("|---|---|---:|---:|---|")
    for r in strace:
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(r["by_call"].items())[:5])
        print(f"| {r['scenario']} | {r['server']} | {r['requests']:,} | {r['per_resp']:.3f} | {top} |")

cg = defaultdict(dict)
for r in rows:
    if r["kind"] == "callgrind":
        cg[(r["server"], r["scenario"])][r["requests"]] = r["ir"]
if cg:
    print("\n## User-space instructions per response (callgrind, difference of two fixed-count runs)\n")
    print("| scenario | nbnet Ir/resp | peer Ir/resp | nbnet/peer |")
    print("|---|---:|---:|---:|")
    per = {}
    for (server, sc), d in cg.items():
        if len(d) >= 2:
            (n1, i1), (n2, i2) = sorted(d.items())[:2]
            per[(server, sc)] = (i2 - i1) / (n2 - n1)
    for sc in sorted({sc for _, sc in cg}):
        a, b = per.get(("nbnet", sc)), per.get(("peer", sc))
        print(f"| {sc} | {fmt(a, 0)} | {fmt(b, 0)} | {ratio(a, b)} |")
