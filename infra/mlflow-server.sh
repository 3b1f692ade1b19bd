#!/usr/bin/env bash
# `mlflow server` for a team: runs and registry in PostgreSQL, artifacts proxied to S3, MLflow's
# basic-auth app. Configured from the environment only, so docker-compose, the Kubernetes Deployment
# and infra/local-stack.sh start the very same server:
#
#   MLFLOW_BACKEND_STORE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow_auth  (users, permissions)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/PREFIX
#   MLFLOW_AUTH_ADMIN_USERNAME      admin user created on first start (default: admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD      its password (first start only; rotate it through the API afterwards)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF secret, the same for every replica
#   MLFLOW_S3_ENDPOINT_URL          S3 endpoint when not AWS (MinIO, moto); AWS_ACCESS_KEY_ID/SECRET for it
#   MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   bind address (0.0.0.0), port (5000), workers (2)
#   MLFLOW_SERVER_ALLOWED_HOSTS     Host headers accepted besides localhost/private IPs, e.g. mlflow:5000
# Extra arguments are passed on to `mlflow server`.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"

# The auth app reads its user-store URI only from an ini file: write one that holds no password of
# its own beyond the database URI, readable by this user only.
if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
  MLFLOW_AUTH_CONFIG_PATH="$(mktemp -d)/basic_auth.ini"
fi
(
  umask 077
  cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
)
export MLFLOW_AUTH_CONFIG_PATH
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

exec mlflow server --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
  "$@"
