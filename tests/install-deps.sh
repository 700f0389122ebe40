#!/usr/bin/env bash
# Installs the system programs the tests run as real peers when they are
# missing: HAProxy (load_balancer), curl (admin, batching), promtool from
# the `prometheus` package (admin: /metrics checked by Prometheus' own
# parser), redis-server, openssl and faketime (tls: the server's clock
# moved ahead, for session-ticket key rotation). Run by `make test` (the
# README's test command) and so by .ci/run. Debian/Ubuntu packages.
#
# As root it installs them with apt-get; otherwise it installs nothing and
# stops with the exact command to run. A test that still finds its program
# missing fails with that command; NBNET_SKIP_MISSING=1 turns that into a
# skip (one visible line per test).
set -euo pipefail

# program:package
wanted=(haproxy:haproxy curl:curl promtool:prometheus redis-server:redis-server openssl:openssl faketime:faketime)

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

missing=()
for pair in "${wanted[@]}"; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

command="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "tests/install-deps.sh: the tests need ${missing[*]}, and only root can install them: run" >&2
    echo "    sudo $command" >&2
    echo "(or run the tests with NBNET_SKIP_MISSING=1 to skip the ones that need them)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/install-deps.sh: no apt-get here: install ${missing[*]} (Debian package names) with your package manager" >&2
    exit 1
fi
echo "tests/install-deps.sh: installing ${missing[*]} (needed by the tests)"
apt-get update -qq
# No service is started: the tests start their own peers on 127.0.0.1.
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for pair in "${wanted[@]}"; do
    have "${pair%%:*}" || {
        echo "tests/install-deps.sh: ${pair%%:*} still missing after installing ${pair#*:}" >&2
        exit 1
    }
done
