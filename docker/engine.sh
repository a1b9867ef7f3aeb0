#!/usr/bin/env bash
# A real Docker engine for the real-container tests, with no image from Docker Hub.
#
#   sudo bash docker/engine.sh up      # install (Debian), start dockerd + a registry, build and push the test images
#   bash docker/engine.sh env          # the variables the tests read (eval "$(bash docker/engine.sh env)")
#   sudo bash docker/engine.sh down    # stop what `up` started
#
# `up` installs Debian's docker.io, runsc (gVisor), docker-registry, busybox-static, iptables and
# gcc when they are missing, starts dockerd with gVisor registered as `runsc` (unless an engine
# already answers on the socket), serves a registry on 127.0.0.1:5000, and pushes two images
# made here: `shedshare-test/busybox` (Debian's static busybox, a nobody user, /tmp 1777, and a
# setuid-root probe binary) under a tag of the build's content. Everything it starts is recorded
# under $SHEDSHARE_ENGINE_DIR (default /tmp/shedshare-engine) and stopped by `down`.
set -euo pipefail

DIR=${SHEDSHARE_ENGINE_DIR:-/tmp/shedshare-engine}
SOCKET=${SHEDSHARE_ENGINE_SOCKET:-/var/run/docker.sock}
REGISTRY=${SHEDSHARE_TEST_REGISTRY:-127.0.0.1:5000}
HERE=$(cd "$(dirname "$0")" && pwd)
export DOCKER_HOST=unix://$SOCKET

say() { echo "engine: $*" >&2; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v runsc >/dev/null || missing+=(runsc)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    [ -x /bin/busybox ] && /bin/busybox --list | grep -qx wget || missing+=(busybox-static)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v gcc >/dev/null || missing+=(gcc libc6-dev)
    command -v ip >/dev/null || missing+=(iproute2)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        # A fresh machine may hold stale package lists: update them once if the install fails.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$DIR/apt.log" 2>&1 \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
                >>"$DIR/apt.log" 2>&1 || { cat "$DIR/apt.log" >&2; exit 1; }
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "$what did not come up in ${seconds} s"
    return 1
}

start_dockerd() {
    if docker version >/dev/null 2>&1; then
        say "an engine already answers on $SOCKET; using it"
        return
    fi
    # gVisor on this kind of kernel starts only with its host network mode, which then uses the
    # network namespace Docker made for the container (none, or the egress bridge).
    cat >"$DIR/daemon.json" <<EOF
{"runtimes": {"runsc": {"path": "$(command -v runsc)", "runtimeArgs": ["--network=host"]}}}
EOF
    say "starting dockerd (log: $DIR/dockerd.log)"
    dockerd --config-file "$DIR/daemon.json" -H "unix://$SOCKET" --pidfile "$DIR/dockerd.pid" \
        >"$DIR/dockerd.log" 2>&1 &
    wait_for 60 dockerd docker version || { tail -20 "$DIR/dockerd.log" >&2; exit 1; }
    touch "$DIR/dockerd.ours"
}

start_registry() {
    if busybox wget -q -O /dev/null "http://$REGISTRY/v2/" 2>/dev/null; then
        say "a registry already answers on $REGISTRY; using it"
        return
    fi
    cat >"$DIR/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DIR/registry}, delete: {enabled: true}}
http: {addr: $REGISTRY}
EOF
    docker-registry serve "$DIR/registry.yml" >"$DIR/registry.log" 2>&1 &
    echo $! >"$DIR/registry.pid"
    wait_for 30 "the registry" busybox wget -q -O /dev/null "http://$REGISTRY/v2/"
}

build_busybox() {
    local root=$DIR/rootfs
    rm -rf "$root" && mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/scratch:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    # A setuid-root program that prints the effective uid it runs with: no-new-privileges must
    # keep it at the caller's.
    gcc -static -O2 -o "$root/bin/euid" "$HERE/engine/euid.c"
    chmod 4755 "$root/bin/euid"
    local tag
    tag=$( (cd "$root" && find . -printf '%p %m %s\n' | sort; sha256sum bin/busybox bin/euid) | sha256sum | cut -c1-12)
    local image=$REGISTRY/shedshare-test/busybox:$tag
    if ! busybox wget -q -O /dev/null "http://$REGISTRY/v2/shedshare-test/busybox/manifests/$tag" 2>/dev/null; then
        tar -C "$root" -c . | docker import - "$image" >/dev/null
        docker push -q "$image" >/dev/null
        docker image rm -f "$image" >/dev/null  # the tests pull it for real
    fi
    echo "$image" >"$DIR/image"
    say "test image $image"
}

up() {
    [ "$(id -u)" = 0 ] || { say "run as root: it installs packages and starts dockerd"; exit 1; }
    mkdir -p "$DIR"
    install_packages
    start_dockerd
    start_registry
    build_busybox
    env_lines >&2
}

env_lines() {
    echo "export DOCKER_HOST=unix://$SOCKET"
    echo "export SHEDSHARE_TEST_IMAGE=$(cat "$DIR/image")"
    echo "export SHEDSHARE_TEST_REGISTRY=$REGISTRY"
    echo "export SHEDSHARE_REQUIRE_ENGINE=1"
}

down() {
    if [ -f "$DIR/dockerd.ours" ]; then
        # Our containers first, so that no sandbox outlives the engine.
        docker ps -aq --filter label=shedshare.allocation | xargs -r docker rm -f >/dev/null 2>&1 || true
        kill "$(cat "$DIR/dockerd.pid")" 2>/dev/null || true
        wait_for 30 "dockerd's exit" sh -c "! kill -0 $(cat "$DIR/dockerd.pid" 2>/dev/null || echo 0) 2>/dev/null" || true
        rm -f "$DIR/dockerd.ours"
    fi
    if [ -f "$DIR/registry.pid" ]; then
        kill "$(cat "$DIR/registry.pid")" 2>/dev/null || true
        rm -f "$DIR/registry.pid"
    fi
}

case ${1:-} in
up) up ;;
env) env_lines ;;
down) down ;;
*) echo "usage: $0 up|env|down" >&2; exit 2 ;;
esac
