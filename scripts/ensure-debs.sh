#!/usr/bin/env bash
# ensure-debs.sh PKG... — make sure the named Debian packages are installed.
#
# * Packages already installed are left alone (idempotent; nothing is printed as "installed").
# * Missing ones are installed with apt-get: `apt-get update` runs once per invocation, and
#   only when something is missing.
# * Works as root without sudo; uses sudo (non-interactive) only when not root.
# * Prints what it did. Exits non-zero if any package could not be installed.
#
# Examples:
#   scripts/ensure-debs.sh wrk
#   scripts/ensure-debs.sh docker-compose wrk
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PKG..." >&2
    exit 2
fi

is_installed() {
    # dpkg-query prints "install ok installed" for a fully installed package.
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for pkg in "$@"; do
    if is_installed "$pkg"; then
        echo "ensure-debs: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-debs: apt-get not found; cannot install: ${missing[*]}" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "ensure-debs: not root and no sudo; cannot install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "ensure-debs: apt-get update (missing: ${missing[*]})"
"${SUDO[@]}" apt-get update -qq
echo "ensure-debs: apt-get install ${missing[*]}"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

rc=0
for pkg in "${missing[@]}"; do
    if is_installed "$pkg"; then
        echo "ensure-debs: installed $pkg"
    else
        echo "ensure-debs: FAILED to install $pkg" >&2
        rc=1
    fi
done
exit "$rc"
