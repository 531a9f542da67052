#!/usr/bin/env bash
# Builds the vmcgi image and checks a container of it end to end:
#
#   - installs docker.io and debootstrap if missing, starts dockerd if it is
#     not running (and stops it again at the end), makes sure the base image
#     exists (scripts/docker-base.sh);
#   - docker build -t vmcgi:test .
#   - runs it with --init, published on 127.0.0.1 only, waits for /up;
#   - GET / must answer 200 with vmcgi-status: OK and vmcgi-vm-boot-time;
#   - docker stop (SIGTERM) while a request is in flight: the request must
#     still be answered, the container must exit 0 within 10 s, and no QEMU
#     of the container may be left;
#   - prints the image size and the timings.
#
#   sudo bash scripts/docker-test.sh [--no-cache]
#
# With NODE_EXTRA_CA_CERTS set, that file is given to the build as the
# secret "ca", for npm behind a proxy that intercepts TLS.
# Exits non-zero, saying why, on the first failure. Environment: IMAGE
# (vmcgi:test), PORT (a free port on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-vmcgi:test}
BUILD_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --no-cache) BUILD_ARGS+=(--no-cache) ;;
        *) echo "usage: bash scripts/docker-test.sh [--no-cache]" >&2; exit 2 ;;
    esac
done

step() { echo "==> $*"; }
fail() {
    echo "docker-test: FAIL: $*" >&2
    exit 1
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
seconds() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }

WORK=$(mktemp -d /tmp/vmcgi-docker-test.XXXXXX)
CONTAINER="vmcgi-test-$$"
DOCKERD_PID=""
CURL_PID=""
cleanup() {
    local rc=$?
    [ -z "$CURL_PID" ] || kill "$CURL_PID" 2>/dev/null || true
    docker rm -f "$CONTAINER-guest" >/dev/null 2>&1 || true
    if docker container inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$rc" != 0 ]; then
            echo "--- container log (last 20 lines):" >&2
            docker logs --tail 20 "$CONTAINER" >&2 2>&1 || true
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ -n "$DOCKERD_PID" ]; then
        echo "==> stopping the dockerd this script started"
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- tools
# A docker client alone is not enough when no daemon answers it: the engine
# (dockerd) and Debian 12's client, whose BuildKit needs no buildx plugin,
# both come with docker.io.
missing=()
if ! command -v docker >/dev/null 2>&1; then
    missing+=(docker.io)
elif ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
    missing+=(docker.io)
fi
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}; as root: apt-get install --no-install-recommends ${missing[*]}"
    step "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "the Docker daemon is not running; start it or run this as root"
    step "starting dockerd"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || fail "dockerd did not come up within 30 s"
fi

bash scripts/docker-base.sh || fail "no base image"

# ---------------------------------------------------------------- build
# The Dockerfile needs BuildKit (FROM --platform=$BUILDPLATFORM): buildx when
# it is installed, else the BuildKit built into Docker 20.10 to 22 (Debian 12's
# docker.io), with DOCKER_BUILDKIT=1.
BUILD=()
if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker buildx build --load)
else
    for cli in docker /usr/bin/docker; do
        version=$("$cli" version -f '{{.Client.Version}}' 2>/dev/null || true)
        if [ -n "$version" ] && [ "${version%%.*}" -lt 23 ] 2>/dev/null; then
            BUILD=(env DOCKER_BUILDKIT=1 "$cli" build)
            break
        fi
    done
fi
[ ${#BUILD[@]} -gt 0 ] || fail "no BuildKit: install the buildx plugin (Debian: docker-buildx) or use Docker 20.10"
# npm inside the build trusts what node here trusts: with NODE_EXTRA_CA_CERTS
# set (a proxy that intercepts TLS), that file goes in as the secret "ca".
if [ -n "${NODE_EXTRA_CA_CERTS:-}" ] && [ -f "$NODE_EXTRA_CA_CERTS" ]; then
    BUILD_ARGS+=(--secret "id=ca,src=$NODE_EXTRA_CA_CERTS")
fi
step "${BUILD[*]} -t $IMAGE . ${BUILD_ARGS[*]}"
t0=$(now_ms)
if ! "${BUILD[@]}" --progress=plain "${BUILD_ARGS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    fail "docker build failed"
fi
BUILD_MS=$(($(now_ms) - t0))
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
# The build steps that took a second or more (BuildKit's plain progress).
STEPS=$(awk '
    /^#[0-9]+ \[/ { id = $1; sub(/^#[0-9]+ /, ""); name[id] = substr($0, 1, 70) }
    /^#[0-9]+ DONE [0-9.]+s$/ { t = $3; sub(/s$/, "", t); if (t + 0 >= 1 && $1 in name) printf "    %7.1f s  %s\n", t, name[$1] }
    /^#[0-9]+ CACHED$/ { cached++ }
    END { if (cached) printf "    (%d steps cached)\n", cached }' "$WORK/build.log")

# ---------------------------------------------------------------- run
PORT=${PORT:-$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })')}
step "docker run --init -p 127.0.0.1:$PORT:80 $IMAGE"
t0=$(now_ms)
docker run -d --init --name "$CONTAINER" -p "127.0.0.1:$PORT:80" "$IMAGE" >/dev/null || fail "docker run failed"
healthy=0
for _ in $(seq 1 600); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 "http://127.0.0.1:$PORT/up" || true)" = 200 ]; then
        healthy=1
        break
    fi
    [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || fail "the container exited before it was healthy"
    sleep 0.1
done
[ "$healthy" = 1 ] || fail "GET /up did not answer 200 within 60 s"
HEALTHY_MS=$(($(now_ms) - t0))

[ "$(docker exec "$CONTAINER" id -un)" = vmcgi ] || fail "the container does not run as the user vmcgi"

# ---------------------------------------------------------------- first request
t0=$(now_ms)
curl -sS -m 30 -D "$WORK/headers" -o "$WORK/body" "http://127.0.0.1:$PORT/" || fail "GET / failed"
FIRST_MS=$(($(now_ms) - t0))
tr -d '\r' <"$WORK/headers" >"$WORK/h"
head -n 1 "$WORK/h" | grep -q '^HTTP/1.1 200' || fail "GET / answered $(head -n 1 "$WORK/h")"
grep -qix 'vmcgi-status: OK' "$WORK/h" || fail "GET / has no 'vmcgi-status: OK' header"
BOOT=$(sed -n 's/^vmcgi-vm-boot-time: //Ip' "$WORK/h")
[ -n "$BOOT" ] || fail "GET / has no vmcgi-vm-boot-time header"

# ---------------------------------------------------------------- SIGTERM while busy
# Start a request, wait until its VM runs, then stop the container: vmcgi
# must finish that request, exit 0, and leave no QEMU.
curl -sS -m 30 -D "$WORK/busy-headers" -o /dev/null "http://127.0.0.1:$PORT/cgi-bin/id" >"$WORK/busy.log" 2>&1 &
CURL_PID=$!
qemu_running=0
for _ in $(seq 1 100); do
    if docker top "$CONTAINER" -eo pid,args 2>/dev/null | grep -q '[q]emu-system'; then
        qemu_running=1
        break
    fi
    sleep 0.05
done
[ "$qemu_running" = 1 ] || fail "no QEMU appeared in the container for the in-flight request"
step "docker stop (SIGTERM) with a request in flight"
t0=$(now_ms)
docker stop -t 10 "$CONTAINER" >/dev/null || fail "docker stop failed"
STOP_MS=$(($(now_ms) - t0))
wait "$CURL_PID" || true
CURL_PID=""
EXIT_CODE=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
[ "$EXIT_CODE" = 0 ] || fail "the container exited with $EXIT_CODE after SIGTERM"
[ "$STOP_MS" -lt 10000 ] || fail "the container took $(seconds "$STOP_MS") to stop (Docker kills at 10 s)"
tr -d '\r' <"$WORK/busy-headers" | head -n 1 | grep -q '^HTTP/1.1 200' ||
    fail "the request in flight during SIGTERM was not answered 200: $(cat "$WORK/busy.log" "$WORK/busy-headers")"
# Any QEMU left on this machine inside the container's cgroup?
CID=$(docker inspect -f '{{.Id}}' "$CONTAINER")
for pid in $(pgrep qemu-system || true); do
    ! grep -q "$CID" "/proc/$pid/cgroup" 2>/dev/null || fail "QEMU $pid of the container outlived it"
done

# ---------------------------------------------------------------- the image build, in the container
# The same `--from-image` with the container's own tools and its shipped
# aarch64 kernel and init: the linux/arm64 half of the test index
# (test/images/build.sh), then served by a container of the image.
IN_CONTAINER_MS=""
INDEX=images/out/test-images/multi
if [ -d "$INDEX" ]; then
    step "building and serving oci:multi --arch aarch64 in the container"
    mkdir -p "$WORK/in-container"
    t0=$(now_ms)
    docker run --rm --user root -v "$PWD/$INDEX:/in:ro" -v "$WORK/in-container:/out" "$IMAGE" \
        node dist/image/main.js --from-image oci:/in --arch aarch64 --out /out >"$WORK/in-container.log" 2>&1 ||
        { tail -n 20 "$WORK/in-container.log" >&2; fail "--from-image in the container failed"; }
    GUEST_CONTAINER="$CONTAINER-guest"
    docker run -d --init --name "$GUEST_CONTAINER" -p "127.0.0.1:$PORT:8080" -v "$WORK/in-container:/guest:ro" "$IMAGE" \
        node dist/main.js --config /guest/vmcgi.json --host 0.0.0.0 --port 8080 >/dev/null || fail "docker run of the image's guest failed"
    page=""
    for _ in $(seq 1 600); do
        page=$(curl -s -m 30 "http://127.0.0.1:$PORT/" || true)
        [ -z "$page" ] || break
        [ "$(docker inspect -f '{{.State.Running}}' "$GUEST_CONTAINER")" = true ] || break
        sleep 0.1
    done
    [ -n "$page" ] || docker logs --tail 20 "$GUEST_CONTAINER" >&2
    docker rm -f "$GUEST_CONTAINER" >/dev/null 2>&1 || true
    grep -q 'hello from a static binary' <<<"$page" || fail "the guest built in the container did not answer: $page"
    IN_CONTAINER_MS=$(($(now_ms) - t0))
    rm -rf "$WORK/in-container" 2>/dev/null || docker run --rm --user root -v "$WORK:/w" "$IMAGE" rm -rf /w/in-container
else
    step "skipped --from-image in the container: no $INDEX (bash test/images/build.sh makes it)"
fi

# ---------------------------------------------------------------- an image of this daemon as a guest
# `npm run images -- --from-image docker-daemon:NAME:TAG`, the source no other
# test has (it needs a daemon): the static test image (test/images/build.sh)
# loaded into this daemon, built into a guest, served by its vmcgi.json alone.
FROM_DAEMON_MS=""
ARCHIVE=images/out/test-images/docker-archive.tar
if [ -f "$ARCHIVE" ] && [ -f dist/main.js ] && [ -f images/out/x86_64/Image ] && [ "$(uname -m)" = x86_64 ]; then
    step "serving docker-daemon:vmcgi-test/static:latest"
    docker load -q -i "$ARCHIVE" >/dev/null || fail "docker load $ARCHIVE failed"
    t0=$(now_ms)
    bash images/build.sh --from-image docker-daemon:vmcgi-test/static:latest --out "$WORK/from-daemon" >"$WORK/from-daemon.log" 2>&1 ||
        { tail -n 20 "$WORK/from-daemon.log" >&2; fail "the build from docker-daemon:vmcgi-test/static:latest failed"; }
    GUEST_PORT=$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })')
    node dist/main.js --config "$WORK/from-daemon/vmcgi.json" --port "$GUEST_PORT" >"$WORK/from-daemon-vmcgi.log" 2>&1 &
    VMCGI_PID=$!
    answered=""
    for _ in $(seq 1 600); do
        answered=$(curl -s -m 30 "http://127.0.0.1:$GUEST_PORT/cgi-bin/id" || true)
        [ -z "$answered" ] || break
        kill -0 "$VMCGI_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$VMCGI_PID" 2>/dev/null || true
    wait "$VMCGI_PID" 2>/dev/null || true
    grep -qx 'uid: 0' <<<"$answered" || { tail -n 20 "$WORK/from-daemon-vmcgi.log" >&2; fail "the guest built from the daemon's image did not answer: $answered"; }
    FROM_DAEMON_MS=$(($(now_ms) - t0))
    sleep 0.5 # QEMU gets SIGKILL when vmcgi exits (setpriv --pdeathsig)
    for pid in $(pgrep -f "qemu-system.*$WORK/from-daemon" || true); do fail "QEMU $pid of the daemon's image outlived vmcgi"; done
    docker image rm -f vmcgi-test/static:latest >/dev/null 2>&1 || true
else
    step "skipped docker-daemon: as a source: no $ARCHIVE, dist/ or x86_64 guest (npm run setup makes them), or not an x86_64 host"
fi

echo
echo "docker-test: OK"
echo "  image size                $(awk -v b="$SIZE" 'BEGIN { printf "%.0f MB", b / 1e6 }')"
echo "  docker build              $(seconds "$BUILD_MS")"
[ -z "$STEPS" ] || echo "$STEPS"
echo "  start to healthy (/up)    $(seconds "$HEALTHY_MS")"
echo "  first request (GET /)     $(seconds "$FIRST_MS") (vmcgi-vm-boot-time: $BOOT)"
echo "  docker stop, 1 in flight  $(seconds "$STOP_MS"), exit code $EXIT_CODE"
[ -z "$IN_CONTAINER_MS" ] || echo "  --from-image, in container built and first answer in $(seconds "$IN_CONTAINER_MS")"
[ -z "$FROM_DAEMON_MS" ] || echo "  docker-daemon: image      built and first answer in $(seconds "$FROM_DAEMON_MS")"
