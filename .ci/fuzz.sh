#!/usr/bin/env bash
# Fuzz nbnet's pure parts with libFuzzer: the framing codec, config parsing
# and the PROXY protocol parser (the targets in host/fuzz/fuzz_targets/).
#
#   .ci/fuzz.sh [SECONDS] [TARGET...]     default: 20 seconds each, every target
#
# Builds the targets with the instrumentation flags cargo-fuzz would pass,
# using the stable toolchain (RUSTC_BOOTSTRAP=1) and no extra tool, then runs
# each for SECONDS, starting from the committed seeds in
# host/fuzz/corpus/<target>/ plus whatever earlier runs found, which is kept in
# target/fuzz/corpus/<target>/ (the seeds are never modified). Exits 1 if a
# target fails (a panic or failed assertion, a hang, running out of memory):
# the input is saved under target/fuzz/artifacts/<target>/ and printed in
# base64, with the command that reproduces it.
#
# Environment:
#   FUZZ_ARGS        more libFuzzer options, e.g. "-jobs=2 -workers=2"
#   FUZZ_TARGET_DIR  build and working directory (default: target/fuzz)
#   FUZZ_ASAN=1      also build with AddressSanitizer (slower; only unsafe
#                    code in dependencies could make it find anything)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]   (SECONDS: a whole number, at least 1)" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(codec config proxy)
fi

root=$(pwd)
work=${FUZZ_TARGET_DIR:-$root/target/fuzz}
mkdir -p "$work"
work=$(cd "$work" && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')

# What `cargo fuzz build` passes (sancov instrumentation, `cfg(fuzzing)`).
# `--target` keeps these flags away from build scripts and proc macros.
flags="-Cpasses=sancov-module"
flags+=" -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" --cfg fuzzing"
if [ "${FUZZ_ASAN:-0}" = 1 ]; then
    flags+=" -Zsanitizer=address -Cunsafe-allow-abi-mismatch=sanitizer"
fi

echo "== fuzz: build ${targets[*]} (${triple})"
start=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTC_BOOTSTRAP=1 RUSTFLAGS="$flags" cargo build --release \
    --manifest-path host/fuzz/Cargo.toml \
    --target "$triple" --target-dir "$work" "${bins[@]}"
echo "built in $(( $(date +%s) - start ))s"

failed=()
for t in "${targets[@]}"; do
    bin="$work/$triple/release/$t"
    seeds="$root/host/fuzz/corpus/$t"
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    marker="$work/.$t.started"
    touch "$marker"
    echo "== fuzz: $t for ${seconds}s"
    # New inputs go to the first directory ($corpus), never to the seeds.
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
    if "$bin" "$corpus" "$seeds" \
        -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$work/$t.log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$work/$t.log" || true
    else
        tail -n 60 "$work/$t.log"
        for crash in $(find "$artifacts" -type f -newer "$marker"); do
            echo "-- $t failed on $crash; the input in base64:"
            base64 "$crash"
            echo "-- reproduce: $bin $crash"
        done
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "== fuzz: FAILED: ${failed[*]} (full logs: $work/<target>.log)" >&2
    exit 1
fi
echo "== fuzz: no failure in ${targets[*]} (${seconds}s each)"
