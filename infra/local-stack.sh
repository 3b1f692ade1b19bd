#!/usr/bin/env bash
# The production stack of infra/docker-compose.yml as plain processes, for machines without Docker
# (CI, the integration tests, a laptop): PostgreSQL (Debian's packages), moto's S3 server standing in
# for MinIO, `mlflow server` with basic auth, `prefect server` and a process worker.
#
#   infra/local-stack.sh up       start everything on free loopback ports, write $HLLM_STACK_DIR/env
#   infra/local-stack.sh status   one line per service; exit 1 if any is down
#   infra/local-stack.sh down     stop everything (worker first, PostgreSQL last)
#
# The stack is throw-away: `up` starts from empty databases and buckets (moto keeps objects in memory,
# so keeping PostgreSQL across restarts would leave runs pointing at lost artifacts).
# Then `source "$HLLM_STACK_DIR/env"` points the project (hllm, mlflow, prefect, dvc) at it.
#
# Settings (environment):
#   HLLM_STACK_DIR       state: pids, logs, databases, env file     (default: <repo>/.stack)
#   HLLM_VENV            virtual environment with the project       (default: <repo>/.venv)
#   HLLM_STACK_TIMEOUT   seconds to wait for each service's health  (default: 180)
#   HLLM_STACK_PREFECT_UI=1   also serve the Prefect UI (slower start)
#   MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD   MLflow admin (default: admin / random)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HLLM_STACK_DIR:-$REPO/.stack}"
VENV="${HLLM_VENV:-$REPO/.venv}"
TIMEOUT="${HLLM_STACK_TIMEOUT:-180}"
MLFLOW_BUCKET=hllm-mlflow
DVC_BUCKET=hllm-dvc
WORK_POOL=hllm-process
REGION=us-east-1

# Offline, telemetry-free services (stack-notes section 4).
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
  DVC_NO_ANALYTICS=1 ITERATIVE_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  GX_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1

log() { printf '[local-stack] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -x "$VENV/bin/python" ]]; then BIN="$VENV/bin/"; else BIN=""; fi
PY="${BIN}python"
command -v "$PY" >/dev/null || PY=python3

# ---------------------------------------------------------------- helpers

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

secret() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(18))'; }

# http_status URL [user:password] -> prints the HTTP status, 000 when nothing answers.
http_status() {
  "$PY" - "$@" <<'EOF'
import base64, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

alive() { [[ -f "$STATE/run/$1.pid" ]] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }

# start NAME CMD... : runs CMD in its own session (pid = process group id, so `down` can stop the
# server together with the workers/flow runs it spawns), output to logs/NAME.log.
# bash starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore the
# default before exec so that `down` can stop the worker with SIGINT.
start() {
  local name=$1; shift
  setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/run/$name.pid"
}

# wait_http NAME URL : until URL answers 200, the process dies, or TIMEOUT.
wait_http() {
  local name=$1 url=$2 t0=$SECONDS
  until [[ "$(http_status "$url")" == 200 ]]; do
    alive "$name" || { tail -n 40 "$STATE/logs/$name.log" >&2; die "$name exited during start-up (log: $STATE/logs/$name.log)"; }
    (( SECONDS - t0 < TIMEOUT )) || { tail -n 40 "$STATE/logs/$name.log" >&2; die "$name not healthy at $url after ${TIMEOUT}s"; }
    sleep 1
  done
  log "$name healthy at $url after $((SECONDS - t0))s"
}

# stop NAME SIGNAL : signal the process group, escalate to SIGKILL after 30 s.
stop() {
  local name=$1 sig=$2 pid t0=$SECONDS
  [[ -f "$STATE/run/$name.pid" ]] || return 0
  pid=$(cat "$STATE/run/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < 30 )); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ignored SIG$sig for 30s: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    log "$name stopped"
  fi
  rm -f "$STATE/run/$name.pid"
}

# ---------------------------------------------------------------- PostgreSQL

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

ensure_postgres() {
  [[ -n "$(pg_bindir)" ]] && return 0
  [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed: run 'sudo apt-get install postgresql' (or this script as root)"
  log "installing PostgreSQL from Debian's packages (apt-get)"
  # No default 'main' cluster/service: this stack runs its own throw-away cluster.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/50-hllm-no-main.conf
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
  [[ -n "$(pg_bindir)" ]] || die "apt-get installed no /usr/lib/postgresql/*/bin"
}

# PostgreSQL refuses to run as root: as root, run it as the 'postgres' user the package creates.
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bindir pgdir pw=$1 port=$2
  bindir=$(pg_bindir)
  pgdir="$STATE/pg"
  mkdir -p "$pgdir"
  if [[ $EUID -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    chown postgres "$pgdir"
    # The state dir may sit under a root-only folder (pytest's tmp): keep the cluster in /tmp then.
    if ! runuser -u postgres -- test -w "$pgdir"; then
      pgdir=$(mktemp -d /tmp/hllm-stack-pg.XXXXXX)
      chown postgres "$pgdir"
    fi
  fi
  echo "$pgdir" >"$STATE/run/pgdir"
  local pwfile="$pgdir/pwfile"
  (umask 077; echo "$pw" >"$pwfile")
  [[ $EUID -eq 0 ]] && chown postgres "$pwfile"
  as_pg "$bindir/initdb" -D "$pgdir/data" -U postgres --pwfile="$pwfile" --auth=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$STATE/logs/initdb.log" 2>&1 || { cat "$STATE/logs/initdb.log" >&2; die "initdb failed"; }
  rm -f "$pwfile"
  # Loopback TCP only, no unix socket: nothing else on the machine is touched.
  as_pg "$bindir/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t "$TIMEOUT" \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=''" start >/dev/null \
    || { tail -n 40 "$pgdir/postgres.log" >&2; die "PostgreSQL did not start"; }
  ln -sf "$pgdir/postgres.log" "$STATE/logs/postgres.log"
  log "postgres up on 127.0.0.1:$port"
}

psql_exec() {  # psql_exec PORT PASSWORD SQL
  PGPASSWORD=$2 "$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$3"
}

stop_postgres() {
  [[ -f "$STATE/run/pgdir" ]] || return 0
  local pgdir; pgdir=$(cat "$STATE/run/pgdir")
  if [[ -f "$pgdir/data/postmaster.pid" ]]; then
    as_pg "$(pg_bindir)/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null && log "postgres stopped"
  fi
}

# ---------------------------------------------------------------- up / down / status

cmd_up() {
  if [[ -f "$STATE/env" ]] && alive prefect-server; then
    die "already up (state $STATE); '$0 down' first"
  fi
  [[ -x "${BIN}mlflow" || -n "$(command -v mlflow)" ]] || die "mlflow not found: run 'make install' or set HLLM_VENV"
  ensure_postgres
  [[ -d "$STATE/run" ]] && cmd_down
  rm -rf "$STATE"
  mkdir -p "$STATE/run" "$STATE/logs" "$STATE/mlflow" "$STATE/prefect"
  chmod 700 "$STATE"
  # A failed start leaves nothing running (the logs stay in $STATE/logs).
  trap 'rc=$?; if (( rc != 0 )); then log "up failed (exit $rc): stopping what it started"; cmd_down; fi' EXIT

  local pg_port s3_port mlflow_port prefect_port pg_pw aws_key aws_secret ml_user ml_pw pf_pw flask_key
  pg_port=$(free_port); s3_port=$(free_port); mlflow_port=$(free_port); prefect_port=$(free_port)
  pg_pw=$(secret); aws_key=$(secret); aws_secret=$(secret); pf_pw=$(secret); flask_key=$(secret)
  ml_user=${MLFLOW_TRACKING_USERNAME:-admin}; ml_pw=${MLFLOW_TRACKING_PASSWORD:-$(secret)}
  local pg_url="postgresql://hllm:$pg_pw@127.0.0.1:$pg_port"
  local s3_url="http://127.0.0.1:$s3_port"

  start_postgres "$pg_pw" "$pg_port"
  psql_exec "$pg_port" "$pg_pw" "CREATE ROLE hllm LOGIN PASSWORD '$pg_pw'"
  for db in mlflow mlflow_auth prefect; do
    psql_exec "$pg_port" "$pg_pw" "CREATE DATABASE $db OWNER hllm"
  done

  export AWS_ACCESS_KEY_ID=$aws_key AWS_SECRET_ACCESS_KEY=$aws_secret AWS_DEFAULT_REGION=$REGION
  start s3 "$PY" -m moto.server -H 127.0.0.1 -p "$s3_port"
  wait_http s3 "$s3_url/moto-api/"
  "$PY" - "$s3_url" "$MLFLOW_BUCKET" "$DVC_BUCKET" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for bucket in sys.argv[2:]:
    s3.create_bucket(Bucket=bucket)
EOF

  # MLflow: the same entry script as docker-compose and Kubernetes (infra/mlflow-server.sh): runs and
  # registry in PostgreSQL, artifacts proxied to the bucket, basic auth with its user store in a
  # second database. Secrets reach it only through the environment.
  PATH="${BIN:+${BIN%/}:}$PATH" \
  MLFLOW_BACKEND_STORE_URI="$pg_url/mlflow" MLFLOW_AUTH_DATABASE_URI="$pg_url/mlflow_auth" \
  MLFLOW_ARTIFACTS_DESTINATION="s3://$MLFLOW_BUCKET/artifacts" \
  MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/basic_auth.ini" \
  MLFLOW_AUTH_ADMIN_USERNAME=$ml_user MLFLOW_AUTH_ADMIN_PASSWORD=$ml_pw \
  MLFLOW_FLASK_SERVER_SECRET_KEY=$flask_key MLFLOW_S3_ENDPOINT_URL=$s3_url \
  MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$mlflow_port MLFLOW_WORKERS=1 \
    start mlflow bash "$REPO/infra/mlflow-server.sh"

  local ui=--no-ui
  [[ "${HLLM_STACK_PREFECT_UI:-0}" == 1 ]] && ui=--ui
  PREFECT_HOME="$STATE/prefect/home" \
  PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://hllm:$pg_pw@127.0.0.1:$pg_port/prefect" \
  PREFECT_SERVER_API_AUTH_STRING="admin:$pf_pw" \
    start prefect-server "${BIN}prefect" server start --host 127.0.0.1 --port "$prefect_port" $ui

  # Both servers start in parallel; each takes 10-30 s on two busy cores.
  wait_http mlflow "http://127.0.0.1:$mlflow_port/health"
  wait_http prefect-server "http://127.0.0.1:$prefect_port/api/health"

  cat >"$STATE/env" <<EOF
# Written by infra/local-stack.sh up: 'source' it to point hllm, mlflow, prefect and dvc at the stack.
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
export MLFLOW_TRACKING_USERNAME=$ml_user
export MLFLOW_TRACKING_PASSWORD=$ml_pw
export PREFECT_API_URL=http://127.0.0.1:$prefect_port/api
export PREFECT_API_AUTH_STRING=admin:$pf_pw
export PREFECT_HOME=$STATE/prefect/client
export HLLM_WORK_POOL=$WORK_POOL
export AWS_ACCESS_KEY_ID=$aws_key
export AWS_SECRET_ACCESS_KEY=$aws_secret
export AWS_DEFAULT_REGION=$REGION
export AWS_ENDPOINT_URL=$s3_url
export MLFLOW_S3_ENDPOINT_URL=$s3_url
export HLLM_DVC_REMOTE_URL=s3://$DVC_BUCKET/store
export HLLM_MLFLOW_ARTIFACTS=s3://$MLFLOW_BUCKET/artifacts
export HLLM_STACK_PG_URL=$pg_url
EOF
  chmod 600 "$STATE/env"

  # Process work pool + worker: deployments of the nightly flow run as subprocesses of the worker,
  # with the stack's environment. Polling every 2 s (default 10) keeps trigger-to-run short.
  (
    # shellcheck disable=SC1091
    source "$STATE/env"
    "${BIN}prefect" --no-prompt work-pool create "$WORK_POOL" --type process --overwrite \
      >"$STATE/logs/work-pool.log" 2>&1 || { cat "$STATE/logs/work-pool.log" >&2; exit 1; }
    PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_WORKER_PREFETCH_SECONDS=5 \
      start prefect-worker "${BIN}prefect" worker start --pool "$WORK_POOL" --type process --name local-worker
  ) || die "work pool '$WORK_POOL' could not be created (log: $STATE/logs/work-pool.log)"
  local t0=$SECONDS
  until grep -q "started!" "$STATE/logs/prefect-worker.log" 2>/dev/null; do
    alive prefect-worker || { tail -n 40 "$STATE/logs/prefect-worker.log" >&2; die "prefect worker exited"; }
    (( SECONDS - t0 < TIMEOUT )) || die "prefect worker did not start after ${TIMEOUT}s"
    sleep 1
  done
  log "prefect worker polling pool '$WORK_POOL'"
  trap - EXIT
  log "up. Point the project at it with: source $STATE/env"
}

cmd_down() {
  [[ -d "$STATE/run" ]] || { log "nothing to stop ($STATE)"; return 0; }
  # Worker before server: it hangs on shutdown when the API is gone, and it answers SIGINT.
  stop prefect-worker INT
  stop prefect-server TERM
  stop mlflow TERM
  stop s3 TERM
  stop_postgres || log "postgres did not stop cleanly"
  local pgdir
  pgdir=$(cat "$STATE/run/pgdir" 2>/dev/null || true)
  # A cluster kept outside the state dir (see start_postgres) is removed here; the rest stays for its logs.
  [[ "$pgdir" == /tmp/hllm-stack-pg.* ]] && rm -rf "$pgdir"
  rm -f "$STATE/run/pgdir" "$STATE/env"
  log "down"
}

cmd_status() {
  [[ -f "$STATE/env" ]] || { log "not up ($STATE/env missing)"; return 1; }
  # shellcheck disable=SC1091
  source "$STATE/env"
  local bad=0 pgdir port code
  pgdir=$(cat "$STATE/run/pgdir")
  port=${HLLM_STACK_PG_URL##*:}
  if as_pg "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    printf '%-15s up    127.0.0.1:%s  data %s\n' postgres "$port" "$pgdir/data"
  else printf '%-15s DOWN\n' postgres; bad=1; fi
  code=$(http_status "$AWS_ENDPOINT_URL/moto-api/")
  if [[ $code == 200 ]]; then printf '%-15s up    %s  buckets %s %s\n' s3 "$AWS_ENDPOINT_URL" "$MLFLOW_BUCKET" "$DVC_BUCKET"
  else printf '%-15s DOWN  (%s)\n' s3 "$code"; bad=1; fi
  code=$(http_status "$MLFLOW_TRACKING_URI/health")
  if [[ $code == 200 ]]; then printf '%-15s up    %s  (basic auth, user %s)\n' mlflow "$MLFLOW_TRACKING_URI" "$MLFLOW_TRACKING_USERNAME"
  else printf '%-15s DOWN  (%s)\n' mlflow "$code"; bad=1; fi
  code=$(http_status "$PREFECT_API_URL/health")
  if [[ $code == 200 ]]; then printf '%-15s up    %s\n' prefect-server "$PREFECT_API_URL"
  else printf '%-15s DOWN  (%s)\n' prefect-server "$code"; bad=1; fi
  if alive prefect-worker; then printf '%-15s up    pool %s  pid %s\n' prefect-worker "$HLLM_WORK_POOL" "$(cat "$STATE/run/prefect-worker.pid")"
  else printf '%-15s DOWN\n' prefect-worker; bad=1; fi
  return $bad
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status   (state in \${HLLM_STACK_DIR:-<repo>/.stack})" >&2; exit 2 ;;
esac
