#!/usr/bin/env bash
# End-to-end check of the deployment (issue 14): build the images, run them, talk to them.
# Too heavy for CI (several GB of images, minutes of CPU): run it by hand on a Docker host,
# as root or a docker-group user, from anywhere:   docker/e2e.sh
#
#  1. base images: the real ones (python:3.11-slim-bookworm, redis:7.4-alpine) if they can
#     be pulled, else local stand-ins bootstrapped from Debian bookworm (debootstrap; needs
#     root): same Debian release, python3 3.11, redis-server 7.0
#  2. build ipdfer:cpu (docker/Dockerfile.cpu) and ipdfer:cuda (docker/Dockerfile, on the CPU:
#     its build loads the model with --network=none; it is not run on a GPU here); sizes
#  3. `docker run --network none ipdfer:cpu` (in-process, no Redis): /readyz with the model
#     loaded, POST /predict and GET /neutralize, from inside the container (no network)
#  4. compose: redis + api + worker-cpu, wait until all three are healthy
#  5. POST /predict + GET /neutralize with the astronaut photo through the published port
#  6. SIGKILL the worker container during a burst of requests: the restart policy brings it
#     back, every request gets exactly one answer (200, or 503/504, the documented retryable
#     ones), no job is left in the stream, pending or dead-lettered
#  7. compose down; images stay (a second run reuses the layers)
#
# Knobs (environment):
#   IPDFER_E2E_BASES=auto|real|standin   base images (auto: real if pullable, else stand-ins)
#   IPDFER_E2E_CACHE=/var/tmp/ipdfer-docker   where the bookworm rootfs is bootstrapped
#   IPDFER_E2E_MIRROR=URL                Debian mirror for debootstrap (default: apt's, else deb.debian.org)
#   IPDFER_E2E_EXTRA_CA="FILE ..."       CA certificates the stand-ins trust (a TLS-intercepting
#                                        proxy); default: /usr/local/share/ca-certificates/*.crt
#   IPDFER_E2E_TORCH_INDEX_DIR=DIR       a PEP 503 tree (DIR/simple/<name>/) served over HTTP to the
#                                        CPU build as TORCH_INDEX_URL, when download.pytorch.org is out
#                                        of reach (on port IPDFER_E2E_INDEX_PORT, 18731);
#                                        IPDFER_E2E_TORCH_VARIANT (default +cpu) goes with it
#   IPDFER_E2E_CUDA=1|0                  build ipdfer:cuda too (default 1; 0 is reported as skipped)
#   IPDFER_E2E_PORT=18000                host port of the API
#   PYTHON=...                           a Python with scikit-image + Pillow (the astronaut photo);
#                                        default .venv/bin/python
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASES=${IPDFER_E2E_BASES:-auto}
CACHE=${IPDFER_E2E_CACHE:-/var/tmp/ipdfer-docker}
PORT=${IPDFER_E2E_PORT:-18000}
BUILD_CUDA=${IPDFER_E2E_CUDA:-1}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PROJECT=ipdfer-e2e
URL=http://127.0.0.1:$PORT
REAL_PYTHON=python:3.11-slim-bookworm
REAL_REDIS=redis:7.4-alpine
STANDIN_DEBIAN=ipdfer-local/debian:bookworm-minbase
STANDIN_PYTHON=ipdfer-local/python:3.11-slim-bookworm
STANDIN_REDIS=ipdfer-local/redis:7-bookworm
OFFLINE=ipdfer-e2e-offline
WORK=$(mktemp -d /tmp/ipdfer-e2e.XXXXXX)
T_START=$EPOCHREALTIME
STEP=setup
HTTP_PID=
BURST_PID=

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
# one CPU worker: step 6 SIGKILLs it and checks that its restart loses no job
compose() { IPDFER_REDIS_IMAGE=$REDIS_IMAGE IPDFER_PUBLISH_PORT=$PORT IPDFER_CPU_WORKERS=1 "${COMPOSE[@]}" -p "$PROJECT" "$@"; }

elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$EPOCHREALTIME"; }
step() { STEP=$1; T_STEP=$EPOCHREALTIME; printf '\n=== %s\n' "$STEP"; }
done_step() { printf -- '--- %s: ok (%s s)\n' "$STEP" "$(elapsed "$T_STEP")"; }
say() { printf '     %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ $rc -ne 0 ]; then
        printf '\nFAILED in step "%s" (exit %s). Logs:\n' "$STEP" "$rc"
        docker container inspect "$OFFLINE" >/dev/null 2>&1 && docker logs --tail 30 "$OFFLINE" 2>&1 | sed 's/^/  offline| /'
        [ -n "${REDIS_IMAGE:-}" ] && compose logs --no-color --tail 30 2>&1 | sed 's/^/  /'
    fi
    [ -n "$BURST_PID" ] && kill "$BURST_PID" 2>/dev/null
    docker rm -f "$OFFLINE" >/dev/null 2>&1
    [ -n "${REDIS_IMAGE:-}" ] && compose --profile cpu down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    rm -rf "$WORK"
    printf '\n=== cleanup done; total %s s; %s\n' "$(elapsed "$T_START")" "$([ $rc -eq 0 ] && echo PASSED || echo FAILED)"
}
trap cleanup EXIT

# --- 0 ----------------------------------------------------------------------------------
step "0. preflight"
docker info --format 'docker server {{.ServerVersion}}, storage {{.Driver}}, {{.NCPU}} CPUs, {{.MemTotal}} bytes RAM' \
    || die "no Docker daemon"
say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1))"
[ -x "$PYTHON" ] || die "PYTHON=$PYTHON: not executable (set PYTHON to a Python with scikit-image and Pillow)"
"$PYTHON" -c "from skimage import data; from PIL import Image; \
Image.fromarray(data.astronaut()).save('$WORK/astronaut.jpg', quality=92)"
say "photo: skimage.data.astronaut() as JPEG, $(stat -c %s "$WORK/astronaut.jpg") bytes (the tests' photo)"
done_step

# --- 1 ----------------------------------------------------------------------------------
step "1. base images"
if [ "$BASES" = auto ]; then
    if docker image inspect "$REAL_PYTHON" "$REAL_REDIS" >/dev/null 2>&1 \
        || { timeout 120 docker pull -q "$REAL_PYTHON" && timeout 120 docker pull -q "$REAL_REDIS"; } >/dev/null 2>&1; then
        BASES=real
    else
        BASES=standin
        say "cannot pull $REAL_PYTHON / $REAL_REDIS (no registry): using local stand-ins"
    fi
fi
case "$BASES" in
real)
    PYTHON_IMAGE=$REAL_PYTHON REDIS_IMAGE=$REAL_REDIS
    docker image inspect "$REAL_PYTHON" "$REAL_REDIS" >/dev/null || die "pull $REAL_PYTHON and $REAL_REDIS first"
    ;;
standin)
    PYTHON_IMAGE=$STANDIN_PYTHON REDIS_IMAGE=$STANDIN_REDIS
    if docker image inspect "$STANDIN_DEBIAN" >/dev/null 2>&1; then
        say "reusing $STANDIN_DEBIAN"
    else
        command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
        [ "$(id -u)" = 0 ] || die "debootstrap needs root"
        MIRROR=${IPDFER_E2E_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
            /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 | awk '{print $2}' || true)}
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
        mkdir -p "$CACHE"
        rm -rf "$CACHE/rootfs-bookworm"
        say "debootstrap --variant=minbase bookworm from $MIRROR"
        debootstrap --variant=minbase bookworm "$CACHE/rootfs-bookworm" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $CACHE/debootstrap.log"
        tar -C "$CACHE/rootfs-bookworm" -c . | docker import - "$STANDIN_DEBIAN" >/dev/null
        rm -rf "$CACHE/rootfs-bookworm"
    fi
    # A TLS-intercepting proxy's CA must be trusted inside, or pip cannot reach PyPI.
    mkdir -p "$WORK/standin/ca"
    for ca in ${IPDFER_E2E_EXTRA_CA-/usr/local/share/ca-certificates/*.crt}; do
        if [ -f "$ca" ]; then cp "$ca" "$WORK/standin/ca/"; say "stand-ins trust $ca"; fi
    done
    cat > "$WORK/standin/Dockerfile.python" <<EOF
# Stand-in for $REAL_PYTHON: Debian bookworm's python3 (3.11) with venv, 'python' on PATH.
FROM $STANDIN_DEBIAN
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 \\
        ca-certificates && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
    cat > "$WORK/standin/Dockerfile.redis" <<'EOF'
# Stand-in for redis:7.4-alpine: Debian bookworm's redis-server (7.0). Like the official
# image's entrypoint, it turns protected mode off when run without a config file (or
# other containers are refused), and runs as the redis user in /data.
FROM ipdfer-local/debian:bookworm-minbase
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '#!/bin/sh\nif [ "${1:-}" = redis-server ]; then set -- "$@" --protected-mode no; fi\nexec "$@"\n' \
        > /usr/local/bin/docker-entrypoint.sh && chmod 755 /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
EOF
    docker build -q -t "$STANDIN_PYTHON" -f "$WORK/standin/Dockerfile.python" "$WORK/standin" >/dev/null
    docker build -q -t "$STANDIN_REDIS" -f "$WORK/standin/Dockerfile.redis" "$WORK/standin" >/dev/null
    docker run --rm "$STANDIN_PYTHON" python -c "import sys; print('     stand-in python', sys.version.split()[0])"
    docker run --rm "$STANDIN_REDIS" redis-server --version | sed 's/^/     stand-in /'
    ;;
*) die "IPDFER_E2E_BASES=$BASES: auto, real or standin" ;;
esac
say "python base: $PYTHON_IMAGE; redis: $REDIS_IMAGE"
done_step

# --- 2 ----------------------------------------------------------------------------------
step "2a. build ipdfer:cpu (docker/Dockerfile.cpu)"
CPU_ARGS=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
if [ -n "${IPDFER_E2E_TORCH_INDEX_DIR:-}" ]; then
    [ -d "$IPDFER_E2E_TORCH_INDEX_DIR/simple" ] || die "$IPDFER_E2E_TORCH_INDEX_DIR/simple: no such index"
    # Serve it where build containers reach the host: the default bridge's gateway.
    GW=$(docker network inspect bridge --format '{{(index .IPAM.Config 0).Gateway}}')
    HTTP_PORT=${IPDFER_E2E_INDEX_PORT:-18731}  # fixed: the URL is a build argument, part of the layer cache key
    # the interpreter itself, not a wrapper (pyenv shims fork): $! must be the server's pid
    "$(python3 -c 'import sys; print(sys.executable)')" -m http.server "$HTTP_PORT" --bind "$GW" \
        --directory "$IPDFER_E2E_TORCH_INDEX_DIR" > "$WORK/http.log" 2>&1 &
    HTTP_PID=$!
    sleep 1
    kill -0 "$HTTP_PID" || die "the index server did not start: $(cat "$WORK/http.log")"
    VARIANT=${IPDFER_E2E_TORCH_VARIANT-+cpu}
    CPU_ARGS+=(--build-arg "TORCH_INDEX_URL=http://$GW:$HTTP_PORT/simple" --build-arg "TORCH_VARIANT=$VARIANT"
               --build-arg "PIP_TRUSTED_HOST=$GW:$HTTP_PORT")
    say "torch index: $IPDFER_E2E_TORCH_INDEX_DIR served at http://$GW:$HTTP_PORT/simple, torch==2.14.1$VARIANT"
    [ "$VARIANT" = +cpu ] || say "WARNING: torch==2.14.1$VARIANT is not the CPU build: this ipdfer:cpu carries" \
        "PyPI's CUDA torch and its nvidia-* wheels, so its size is NOT the real CPU image's"
fi
docker build --progress=plain -f docker/Dockerfile.cpu -t ipdfer:cpu "${CPU_ARGS[@]}" . > "$WORK/build-cpu.log" 2>&1 \
    || { tail -40 "$WORK/build-cpu.log"; die "docker build ipdfer:cpu"; }
grep -A1 -E "Pipeline.load.*worker='build'" "$WORK/build-cpu.log" | grep -oE "\{'name'.*" | head -1 \
    | sed 's/^/     offline load check in the build: /' || true
[ -n "$HTTP_PID" ] && { kill "$HTTP_PID"; HTTP_PID=; }
done_step

step "2b. build ipdfer:cuda (docker/Dockerfile)"
if [ "$BUILD_CUDA" = 1 ]; then
    docker build --progress=plain -f docker/Dockerfile -t ipdfer:cuda --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" . \
        > "$WORK/build-cuda.log" 2>&1 || { tail -40 "$WORK/build-cuda.log"; die "docker build ipdfer:cuda"; }
    docker run --rm --network none --entrypoint python ipdfer:cuda -c "import torch; \
print('     ipdfer:cuda: torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPU here:', torch.cuda.is_available())"
    if ! docker info --format '{{json .Runtimes}}' | grep -q nvidia; then
        say "ipdfer:cuda built (its build loaded the model on the CPU, offline) but NOT run on a GPU:" \
            "this host has no NVIDIA runtime"
    fi
else
    say "SKIPPED: IPDFER_E2E_CUDA=$BUILD_CUDA"
fi
done_step

step "2c. image sizes"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}\t{{.ID}}' \
    | grep -E "^(ipdfer:(cpu|cuda)|${PYTHON_IMAGE}|${REDIS_IMAGE})\s" | sed 's/^/     /'
docker image inspect ipdfer:cpu --format '     ipdfer:cpu: {{len .RootFS.Layers}} layers, {{.Size}} bytes'
done_step

# --- 3 ----------------------------------------------------------------------------------
step "3. docker run --network none ipdfer:cpu (in-process model, no Redis)"
docker run -d --name "$OFFLINE" --network none ipdfer:cpu >/dev/null
[ "$(docker inspect -f '{{.HostConfig.NetworkMode}}' "$OFFLINE")" = none ] || die "not --network none"
docker cp docker/e2e_client.py "$OFFLINE:/tmp/e2e_client.py"
docker cp "$WORK/astronaut.jpg" "$OFFLINE:/tmp/astronaut.jpg"
docker exec "$OFFLINE" python -c "import socket; n = [i[1] for i in socket.if_nameindex()]; \
print('     interfaces inside:', n); assert n == ['lo'], n"
docker exec "$OFFLINE" python /tmp/e2e_client.py ready http://127.0.0.1:8000 300
docker exec "$OFFLINE" python /tmp/e2e_client.py roundtrip http://127.0.0.1:8000 /tmp/astronaut.jpg
docker rm -f "$OFFLINE" >/dev/null
done_step

# --- 4 ----------------------------------------------------------------------------------
step "4. compose up: redis + api + worker-cpu"
compose --profile cpu up -d --no-build redis api worker-cpu 2>&1 | sed 's/^/     /'
wait_healthy() {  # SERVICE TIMEOUT_S
    local cid t0=$EPOCHREALTIME status
    cid=$(compose ps -q "$1")
    [ -n "$cid" ] || die "no container for $1"
    while :; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}no healthcheck{{end}}' "$cid")
        [ "$status" = healthy ] && break
        [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$2" ] || die "$1: $status after $2 s"
        sleep 2
    done
    say "$1 healthy after $(elapsed "$t0") s"
}
for svc in redis api worker-cpu; do wait_healthy "$svc" 400; done
python3 docker/e2e_client.py ready "$URL" 60
done_step

step "5. POST /predict + GET /neutralize through the published port $PORT"
python3 docker/e2e_client.py roundtrip "$URL" "$WORK/astronaut.jpg"
done_step

# --- 6 ----------------------------------------------------------------------------------
step "6. SIGKILL the worker container during a burst"
WORKER=$(compose ps -q worker-cpu)
RESTARTS=$(docker inspect -f '{{.RestartCount}}' "$WORKER")
python3 docker/e2e_client.py burst "$URL" "$WORK/astronaut.jpg" "$WORK" &
BURST_PID=$!
for _ in $(seq 240); do [ "$(cat "$WORK/answered" 2>/dev/null || echo 0)" -ge 8 ] && break; sleep 0.5; done
[ "$(cat "$WORK/answered" 2>/dev/null || echo 0)" -ge 8 ] || die "the burst got no 8 answers in 120 s"
# kill the container's init (docker-init) from the host: the whole container dies as in
# an OOM kill. (`docker kill` would count as a manual stop: no restart by the policy.)
PID=$(docker inspect -f '{{.State.Pid}}' "$WORKER")
T_KILL=$EPOCHREALTIME
kill -KILL "$PID" || die "cannot SIGKILL pid $PID (run as root)"
echo "$T_KILL" > "$WORK/killed"
say "SIGKILLed the worker container (pid $PID) after $(cat "$WORK/answered") answers"
while [ "$(docker inspect -f '{{.RestartCount}}' "$WORKER")" -le "$RESTARTS" ]; do
    [ "$(elapsed "$T_KILL" | cut -d. -f1)" -lt 60 ] || die "the worker was not restarted within 60 s"
    sleep 0.5
done
# --until with the fraction: cut to the second, it leaves out a die event of the current second
EXIT=$(docker events --since "${T_KILL%.*}" --until "$(date +%s.%N)" --filter "container=$WORKER" --filter event=die \
    --format '{{index .Actor.Attributes "exitCode"}}' | head -1)
say "restarted by the restart policy $(elapsed "$T_KILL") s after the kill (died with exit code $EXIT," \
    "RestartCount $(docker inspect -f '{{.RestartCount}}' "$WORKER"))"
[ "$EXIT" = 137 ] || die "the worker container died with exit code '$EXIT', not 137 (SIGKILL)"
wait "$BURST_PID" || { BURST_PID=; die "burst checks failed"; }
BURST_PID=
wait_healthy worker-cpu 300
# Redis: nothing waiting, in flight or dead-lettered; no answer left beyond the 504s'
rcli() { compose exec -T redis redis-cli "$@"; }
for _ in $(seq 60); do [ "$(rcli XLEN ipdfer:jobs)" = 0 ] && break; sleep 1; done
JOBS=$(rcli XLEN ipdfer:jobs) PENDING=$(rcli XPENDING ipdfer:jobs workers | head -1) DEAD=$(rcli XLEN ipdfer:dead)
LEFT=$(rcli --scan --pattern 'ipdfer:result:*' | wc -l)
N504=$(python3 -c "import json, sys; print(sum(a['status'] == 504 for a in json.load(open(sys.argv[1]))))" "$WORK/burst.json")
say "redis: jobs stream $JOBS, pending $PENDING, dead letters $DEAD, unread answers $LEFT (504s: $N504)"
[ "$JOBS" = 0 ] && [ "$PENDING" = 0 ] && [ "$DEAD" = 0 ] || die "jobs left in Redis"
[ "$LEFT" -le "$N504" ] || die "$LEFT unread answers but only $N504 requests timed out: an answer twice?"
python3 docker/e2e_client.py roundtrip "$URL" "$WORK/astronaut.jpg"
done_step

# --- 7 ----------------------------------------------------------------------------------
step "7. compose down"
compose --profile cpu down --volumes --remove-orphans --timeout 30 2>&1 | sed 's/^/     /'
[ -z "$(compose ps -q)" ] || die "containers left"
done_step
