#!/usr/bin/env bash
# Checks the shipped systemd units (config/nbnet.service, config/nbnet.socket):
#
#   1. `systemd-analyze verify`: the units parse, with no unknown option, no
#      bad value, no missing command. Verify insists that every Exec*= binary
#      exists, so it runs on a temporary copy in which each missing one
#      (/usr/local/bin/nbnet) is replaced by `true`. Any message counts as a
#      failure: verify exits 0 on an unknown key or an unparsable value.
#   2. `systemd-analyze security --offline=yes`: the service's exposure score
#      must be at most MAX_EXPOSURE (2.5, "OK"). Offline mode reads the unit
#      file alone, so it works without systemd running (in a container, with
#      systemd not PID 1).
#
#   .ci/check-unit.sh          run from anywhere; called by .ci/run
#
# Installs Debian's `systemd` package (it provides systemd-analyze) when
# systemd-analyze is missing, as tests/install-deps.sh installs its tools.
# Exits 1, naming the score and the worst offenders, when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=2.5
service=config/nbnet.service
socket=config/nbnet.socket

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: installing systemd (for systemd-analyze)"
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "check-unit: not root and no sudo: install it yourself: apt-get install systemd" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "check-unit: no apt-get here: install systemd-analyze (package systemd) yourself" >&2
        exit 1
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
systemd-analyze --version | sed -n 1p

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. verify, on copies whose missing Exec*= binaries are replaced by `true`.
true_bin=$(command -v true)
cp "$service" "$socket" "$work/"
missing=$(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "$service" | sort -u)
for bin in $missing; do
    if [ ! -x "$bin" ]; then
        echo "check-unit: verify with $bin (not installed here) replaced by $true_bin"
        sed -i "s|$bin|$true_bin|g" "$work/$(basename "$service")"
    fi
done
if ! out=$(systemd-analyze verify "$work/$(basename "$service")" "$work/$(basename "$socket")" 2>&1) \
    || [ -n "$out" ]; then
    echo "$out" | sed "s|$work/||g" >&2
    echo "check-unit: FAILED: systemd-analyze verify reports the messages above for $service / $socket" >&2
    exit 1
fi
echo "check-unit: systemd-analyze verify: $service and $socket are clean"

# 2. The exposure score of the unit as shipped.
report=$(systemd-analyze security --offline=yes --no-pager "$service" 2>&1) || {
    echo "$report" >&2
    echo "check-unit: FAILED: systemd-analyze security --offline=yes could not assess $service" >&2
    exit 1
}
score=$(echo "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p')
if [ -z "$score" ]; then
    echo "$report" >&2
    echo "check-unit: FAILED: no overall exposure level in the output above" >&2
    exit 1
fi
verdict=$(echo "$report" | sed -n 's/.*Overall exposure level for [^:]*: [0-9.]* \([A-Z]*\).*/\1/p')
# The options that cost the most, worst first (the last column is the cost).
offenders=$(echo "$report" | grep '^✗' | awk '{print $NF "\t" $0}' | sort -rn -k1,1 | cut -f2- | sed -n 1,8p)
if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
    echo "check-unit: FAILED: $service exposure $score $verdict is above $MAX_EXPOSURE; the worst offenders:" >&2
    echo "$offenders" >&2
    echo "(full report: systemd-analyze security --offline=yes $service)" >&2
    exit 1
fi
echo "check-unit: systemd-analyze security: $service exposure $score $verdict (at most $MAX_EXPOSURE); what still costs:"
echo "$offenders"
