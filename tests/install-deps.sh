#!/usr/bin/env bash
# Installs the system programs the tests run as real peers — HAProxy (the
# load-balancer test) and curl (the admin endpoint test) — when they are
# missing. Run by `make test` (the README's test command) and by .ci/run.
# Debian/Ubuntu packages; as root, or through sudo.
set -euo pipefail

missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "tests/install-deps.sh: installing ${missing[*]} (needed by the tests)"
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "tests/install-deps.sh: not root and no sudo: install them yourself: apt-get install ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/install-deps.sh: no apt-get here: install ${missing[*]} with your package manager" >&2
    exit 1
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
