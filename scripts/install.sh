#!/usr/bin/env bash
# Install what bmsd and its tests need on Debian (12 or newer), as root:
#   PostgreSQL server and headers, Mosquitto and its clients, TimescaleDB,
#   and a virtualenv (.venv) with bmsd and its test tools.
# It reaches only the distribution's package archive and PyPI, and does
# nothing that is already done, so running it again is quick.
#
# TimescaleDB: if the installed PostgreSQL already has it, it is kept (any
# edition). Else the distribution's package is installed if it has one. Else
# (Debian 12 has none) the timescaledb source package of the next Debian
# release is fetched from the same archive this machine already uses and
# built against the installed PostgreSQL. That is the Apache-only edition:
# no continuous aggregates, compression or retention policies; `bmsd
# migrate --skip-community-features` and the test suite know what to skip.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then exec sudo -E bash "$0" "$@"; fi
    die "run as root (apt-get installs system packages)"
fi
[ -r /etc/os-release ] && . /etc/os-release
case "${ID:-} ${ID_LIKE:-}" in
    *debian*) ;;
    *) die "this script knows Debian and its derivatives; found '${PRETTY_NAME:-unknown}'" ;;
esac
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ $apt_updated -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    say "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- PostgreSQL, Mosquitto, build tools -------------------------------------
# systemd: its systemd-analyze checks the units in systemd/ (tests/test_units.py);
# systemd-container and debootstrap boot a real systemd for tests/test_systemd_boot.py;
# iproute2 and iptables make the network partition of tests/test_partition.py;
# prometheus: promtool and a real server for tests/test_prometheus.py;
# docker-compose parses docker-compose.yml (tests/test_compose.py); docker.io's
# engine builds the image and runs the stack (tests/test_docker.py starts its own
# dockerd where none answers; stand-in images are built on a debootstrap tree).
apt_install postgresql postgresql-client postgresql-server-dev-all mosquitto mosquitto-clients \
    python3 python3-venv python3-dev build-essential cmake libssl-dev libkrb5-dev xz-utils \
    ca-certificates openssl systemd systemd-container debootstrap iproute2 iptables prometheus \
    docker-compose docker.io
pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_config=/usr/lib/postgresql/$pg_version/bin/pg_config
[ -x "$pg_config" ] || die "PostgreSQL $pg_version has no pg_config at $pg_config"
say "PostgreSQL $pg_version"

# --- TimescaleDB -----------------------------------------------------------
ext_dir=$("$pg_config" --sharedir)/extension
if [ -e "$ext_dir/timescaledb.control" ]; then
    say "TimescaleDB $(sed -n "s/^default_version = '\(.*\)'/\1/p" "$ext_dir/timescaledb.control")" \
        "is already installed for PostgreSQL $pg_version: keeping it"
elif apt-cache show "postgresql-$pg_version-timescaledb" >/dev/null 2>&1 \
     || { apt-get update -qq && apt_updated=1 \
          && apt-cache show "postgresql-$pg_version-timescaledb" >/dev/null 2>&1; }; then
    apt_install "postgresql-$pg_version-timescaledb"
else
    # This machine's Debian archive (from its own apt sources), next release.
    archive=$(awk '/^URIs:/ && !/security/ {print $2; exit}' \
                  /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$archive" ] || archive=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' \
                                   /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$archive" ] || die "cannot tell which Debian archive this machine uses"
    case "${VERSION_CODENAME:-}" in
        bookworm) source_suite=trixie ;;
        *) die "no TimescaleDB package for PostgreSQL $pg_version on ${PRETTY_NAME:-this system}" ;;
    esac
    work=$(mktemp -d /tmp/bmsd-timescaledb.XXXXXX)
    chmod 755 "$work"  # apt downloads as the _apt user
    trap 'rm -rf "$work"' EXIT
    say "building TimescaleDB (Apache-only) from Debian $source_suite's source package"
    mkdir -p "$work/lists/partial" "$work/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive $source_suite main" \
        > "$work/sources.list"
    apt_private=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
                 -o "Dir::State::Lists=$work/lists")
    apt-get "${apt_private[@]}" update -qq
    (cd "$work/src" && apt-get "${apt_private[@]}" source --download-only -qq timescaledb \
        2>&1 | grep -v "unsandboxed" || true)
    orig=$(ls "$work"/src/timescaledb_*.orig.tar.* 2>/dev/null | head -1)
    [ -n "$orig" ] || die "could not download the timescaledb source package"
    tar -xf "$orig" -C "$work/src"
    src=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d | head -1)
    (cd "$src" && ./bootstrap -DAPACHE_ONLY=ON -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPG_CONFIG="$pg_config" \
        >"$work/build.log" 2>&1 \
     && make -C build -j"$(nproc)" >>"$work/build.log" 2>&1 \
     && make -C build install >>"$work/build.log" 2>&1) \
        || { tail -30 "$work/build.log" >&2; die "building TimescaleDB failed"; }
    say "installed TimescaleDB from $(basename "$orig") (Apache-only edition)"
fi

# --- Python virtualenv ------------------------------------------------------
python=${BMSD_PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "bmsd needs Python 3.11 or newer; $($python --version) found"
# venv DIR IMPORTS SOURCE WHAT PIP-ARGS...: make the virtualenv DIR, and install into
# it with PIP-ARGS when IMPORTS fail or SOURCE changed since the last install.
venv() {
    local dir=$1 imports=$2 source=$3 what=$4
    shift 4
    if [ ! -x "$dir/bin/python" ]; then
        say "creating $dir"
        "$python" -m venv "$dir"
    fi
    if ! "$dir/bin/python" -c "import $imports" 2>/dev/null || [ "$source" -nt "$dir/.installed" ]; then
        say "installing $what into $(basename "$dir")"
        "$dir/bin/python" -m pip install -q --upgrade pip
        "$dir/bin/python" -m pip install -q "$@"
        touch "$dir/.installed"
    fi
}
venv "$repo/.venv" "bmsd, pytest, testcontainers, hypothesis" "$repo/pyproject.toml" \
    "bmsd and its test tools" -e "$repo[test]"
# A Sparkplug B edge node that is not ours (tests/test_sparkplug.py): pysparkplug
# needs paho-mqtt 1 where bmsd needs 2, so it has a virtualenv of its own.
venv "$repo/.venv-edge" pysparkplug "$repo/tests/edge/requirements.txt" \
    "the test edge node (pysparkplug)" -r "$repo/tests/edge/requirements.txt"
say "ready"
