#!/usr/bin/env bash
# The images of docker/compose.yaml, with nothing from Docker Hub: every base is made here from
# Debian's packages.
#
#   sudo bash docker/build.sh          # all of it; then: docker-compose -f docker/compose.yaml up -d
#   sudo bash docker/build.sh base     # only shedshare/debian, shedshare/postgres and shedshare/redis
#   sudo bash docker/build.sh wheels   # only the wheelhouses of docker/.wheels/ (from docker/lock/)
#
# shedshare/debian:bookworm is a minbase root made by mmdebstrap from deb.debian.org (python3,
# python3-venv, ca-certificates, tzdata) and imported with `docker import`; the PostgreSQL 15 and
# Redis images are Debian's packages on it (docker/postgres.Dockerfile, docker/redis.Dockerfile).
# Each is tagged with a digest of what it is made from (package list, mirrors, Dockerfile, the
# files it copies, the base's tag), so a run where none of that changed builds nothing; the
# plain tags (bookworm, 15, 7) follow the newest build. SHEDSHARE_BASE_REFRESH=1 remakes them
# anyway, for Debian's security updates.
#
# The Python packages come from PyPI on this machine, not inside a build: the locked versions
# (docker/lock/server.txt, docker/lock/agent.txt; pyproject's ranges until those exist) are
# downloaded as wheels into docker/.wheels/ (git-ignored), and the images install them with
# --no-index. The server's and agent's own code is copied by their Dockerfiles, so after a code
# change `docker-compose up --build` is enough; after a lock change run this again.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
WHEELS=$HERE/.wheels
PIP_CACHE=${SHEDSHARE_PIP_CACHE:-$HOME/.cache/shedshare-build-pip}
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
PYTHON=${PYTHON:-python3}
MIRROR=${SHEDSHARE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SHEDSHARE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_PACKAGES=python3,python3-venv,ca-certificates,tzdata,netbase
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}

say() { echo "build: $*" >&2; }
digest() { sha256sum | cut -c1-12; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# Runs a command with its output kept back unless it fails (the legacy builder's notices).
quiet() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    [ "$status" -eq 0 ] || cat "$log" >&2
    rm -f "$log"
    return "$status"
}

# Tag $1 (repository:prefix) with the digest $2 unless it exists: runs "${@:3}" to make it.
tagged_build() {
    local name=$1 tag=$2
    shift 2
    local image=$name-$tag moving=${name}
    if [ -z "${SHEDSHARE_BASE_REFRESH:-}" ] && have_image "$image"; then
        say "$image is up to date"
    else
        say "making $image"
        "$@" "$image"
    fi
    docker tag "$image" "$moving"
    echo "$image"
}

debian_root() {  # debian_root IMAGE
    local sources=(
        "deb $MIRROR bookworm main"
        "deb $MIRROR bookworm-updates main"
        "deb $SECURITY_MIRROR bookworm-security main"
    )
    # No documentation, manual pages or translations, and no package lists left behind: the
    # images that add packages fetch fresh lists.
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm - "${sources[@]}" |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$1" >/dev/null
}

dockerfile_build() {  # dockerfile_build DOCKERFILE BASE IMAGE
    quiet docker build --force-rm --file "$HERE/$1" --build-arg "BASE=$2" --tag "$3" "$HERE/base"
}

base() {
    command -v mmdebstrap >/dev/null || { say "installing mmdebstrap"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null; }
    local debian postgres redis
    debian=$(tagged_build shedshare/debian:bookworm \
        "$(printf '%s\n' "$BASE_PACKAGES" "$MIRROR" "$SECURITY_MIRROR" "$(declare -f debian_root)" | digest)" debian_root)
    postgres=$(tagged_build shedshare/postgres:15 \
        "$(cat "$HERE/postgres.Dockerfile" "$HERE/base/postgres-entrypoint.sh" <(echo "$debian") | digest)" \
        dockerfile_build postgres.Dockerfile "$debian")
    redis=$(tagged_build shedshare/redis:7 \
        "$(cat "$HERE/redis.Dockerfile" "$HERE/base/redis-entrypoint.sh" <(echo "$debian") | digest)" \
        dockerfile_build redis.Dockerfile "$debian")
    say "bases: $debian $postgres $redis"
}

# The requirements an image installs: the lock's pins (their comments left out), or, without a
# lock, the dependency ranges of the distribution's pyproject.toml.
requirements() {  # requirements LOCK PYPROJECT
    "$PYTHON" - "$@" <<'PY'
import pathlib, sys, tomllib
lock, pyproject = map(pathlib.Path, sys.argv[1:])
if lock.exists():
    for line in lock.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            print(line)
else:
    print(*tomllib.loads(pyproject.read_text())["project"]["dependencies"], sep="\n")
PY
}

wheelhouse() {  # wheelhouse NAME LOCK PYPROJECT [EXTRA REQUIREMENT...]
    local name=$1 lock=$2 pyproject=$3 dir=$WHEELS/$1
    shift 3
    local wanted
    wanted=$(requirements "$lock" "$pyproject"; printf '%s\n' "$@")
    if [ -f "$dir/requirements.txt" ] && [ "$wanted" = "$(cat "$dir/requirements.txt")" ]; then
        say "wheels for $name are up to date ($(ls "$dir"/*.whl | wc -l) wheels)"
        return
    fi
    say "downloading the wheels for $name ($([ -f "$lock" ] && echo "${lock#"$ROOT"/}" || echo "${pyproject#"$ROOT"/}, no lock yet"))"
    rm -rf "$dir.new" && mkdir -p "$dir.new" "$PIP_CACHE"
    echo "$wanted" >"$dir.new/requirements.txt"
    # pip runs in the base image itself, so that the lock's environment markers are read for the
    # images' Python (Debian's 3.11.2, not this machine's) and any wheel built from a source
    # archive is built for it; its downloads are cached on this machine between runs.
    # It trusts the certificate authorities this machine trusts (a proxy's, where one intercepts).
    docker run --rm --network host -v "$dir.new:/wheels" -v "$PIP_CACHE:/root/.cache/pip" \
        -v "$HOST_CA:/etc/ssl/host-ca.crt:ro" -e PIP_CERT=/etc/ssl/host-ca.crt shedshare/debian:bookworm \
        sh -c 'python3 -m venv /tmp/pip && /tmp/pip/bin/pip wheel --quiet --disable-pip-version-check \
            --wheel-dir /wheels -r /wheels/requirements.txt'
    rm -rf "$dir" && mv "$dir.new" "$dir"
}

wheels() {
    wheelhouse server "$ROOT/docker/lock/server.txt" "$ROOT/pyproject.toml"
    # setuptools builds the agent's distribution inside its image, from the source copied there.
    wheelhouse agent "$ROOT/docker/lock/agent.txt" "$ROOT/nodes/agent/pyproject.toml" "setuptools>=69"
}

apps() {
    quiet docker build --force-rm --file "$HERE/Dockerfile" --tag shedshare/server:local "$ROOT"
    quiet docker build --force-rm --file "$HERE/agent.Dockerfile" --tag shedshare/agent:local "$ROOT"
    say "apps: shedshare/server:local shedshare/agent:local"
}

case ${1:-all} in
base) base ;;
wheels) wheels ;;
apps) apps ;;
all) base && wheels && apps ;;
*) echo "usage: $0 [all|base|wheels|apps]" >&2; exit 2 ;;
esac
