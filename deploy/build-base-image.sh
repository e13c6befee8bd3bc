#!/usr/bin/env bash
# Everything `docker-compose build` needs on a machine that reaches no image registry
# and whose containers cannot reach the Python package index (CI, air-gapped labs):
#
#   1. a Docker engine (Debian's docker.io, docker-compose, debootstrap; dockerd
#      started in the background when nothing runs it, e.g. no systemd);
#   2. the base image the Dockerfile names, debian:bookworm-slim, made locally:
#      debootstrap --variant=minbase from the Debian mirror apt already uses, then
#      `docker import` under that very tag (cached as build/compose/base.tar);
#   3. the Python dependencies as wheels in build/wheels (built on this host with a
#      Python 3.11, as in the image; netfilterqueue compiled against this host's
#      libnetfilter-queue-dev), which the Dockerfile installs from instead of the index.
#
# Each step is skipped when its result is already there, so a rerun takes seconds.
# Run as root from anywhere:  deploy/build-base-image.sh     (PYTHON=... to pick the
# interpreter that builds the wheels; SERVAL_REBUILD_BASE=1 to remake the base.)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$REPO/build/compose
WHEELS=$REPO/build/wheels
BASE_TAG=${BASE_IMAGE:-debian:bookworm-slim}
SUITE=bookworm
PYTHON=${PYTHON:-python3}
DOCKER=${DOCKER:-docker}

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
mkdir -p "$CACHE"

# --- 1. the engine ---------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v "$DOCKER" >/dev/null || missing+=(docker.io)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        log "starting docker.service"
        systemctl start docker
    else
        # No init system to ask: run the engine ourselves. Its default bridge and address
        # pools stay inside 198.19.0.0/16, like everything the project's tests create.
        log "starting dockerd in the background (log: $CACHE/dockerd.log)"
        setsid dockerd --bip=198.19.254.1/24 \
            --default-address-pool base=198.19.128.0/18,size=24 \
            >>"$CACHE/dockerd.log" 2>&1 </dev/null &
        echo $! >"$CACHE/dockerd.pid"
    fi
    for _ in $(seq 1 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 0.5
    done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" >&2 || true; die "the Docker engine did not come up"; }
fi

# --- 2. the base image ---------------------------------------------------------------------
mirror() {
    # the Debian mirror apt uses here (deb822 or one-line sources), else the default
    local m
    m=$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list \
        | grep -v -- '-security' | grep -o -E 'https?://[^ ]+/debian/?' | head -1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

if [ "${SERVAL_REBUILD_BASE:-0}" = 1 ]; then
    rm -f "$CACHE/base.tar"
    "$DOCKER" image rm -f "$BASE_TAG" >/dev/null 2>&1 || true
fi
if ! "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    if [ ! -s "$CACHE/base.tar" ]; then
        MIRROR=$(mirror)
        root=$CACHE/rootfs
        rm -rf "$root"
        log "debootstrap --variant=minbase $SUITE from $MIRROR"
        debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
        # what the official image has: the same suites in deb822 form, no caches
        rm -f "$root/etc/apt/sources.list"
        security=${MIRROR%/debian*}/debian-security
        cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/tmp/*
        tar --numeric-owner -C "$root" -cf "$CACHE/base.tar.tmp" .
        mv "$CACHE/base.tar.tmp" "$CACHE/base.tar"
        rm -rf "$root"
    fi
    log "importing $CACHE/base.tar as $BASE_TAG"
    "$DOCKER" import --change 'CMD ["bash"]' "$CACHE/base.tar" "$BASE_TAG" >/dev/null
fi

# --- 3. wheels -----------------------------------------------------------------------------
# The image's Python is Debian bookworm's 3.11: the compiled wheels must be cp311.
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || die "$PYTHON is Python $pyver; the image has 3.11 (set PYTHON=...)"
reqs=$("$PYTHON" -c 'import configparser, sys
c = configparser.ConfigParser(); c.read(sys.argv[1])
print("\n".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))' "$REPO/setup.cfg")
stamp=$(printf '%s\n' "$reqs" setuptools wheel | sha256sum | cut -c1-16)
if [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" != "$stamp" ] || ! ls "$WHEELS"/netfilterqueue-*.whl >/dev/null 2>&1; then
    [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || {
        log "installing libnetfilter-queue-dev (netfilterqueue compiles against it)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnetfilter-queue-dev build-essential python3-dev >/dev/null
    }
    log "building wheels into $WHEELS"
    rm -rf "$WHEELS"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$WHEELS" $reqs setuptools wheel
    echo "$stamp" >"$WHEELS/.stamp"
fi
log "ready: $BASE_TAG ($("$DOCKER" image inspect -f '{{.Id}}' "$BASE_TAG" | cut -c8-19)), $(ls "$WHEELS"/*.whl | wc -l) wheels"
