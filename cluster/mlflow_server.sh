#!/usr/bin/env bash
# Start the cluster's MLflow tracking server in the background on the Ray head (idempotent);
# `mlflow_server.sh stop` stops it (its whole process group).
#
# Binds to the head's private address only (the cluster's own nodes reach it, nothing else);
# users come in through SSH port forwarding (docs/cluster.md). Settings, all from the environment
# (cluster.yaml sources ~/mlpscale/cluster/cluster.env first; no credentials live in the repository):
#   MLPSCALE_MLFLOW_BACKEND_URI   backend store, e.g. postgresql+psycopg2://user:pass@db-host:5432/mlflow
#                                 (default: sqlite file under $MLPSCALE_MLFLOW_DIR)
#   MLPSCALE_MLFLOW_ARTIFACTS     artifact destination the server proxies (s3://bucket/prefix or a
#                                 path; default $MLPSCALE_MLFLOW_DIR/artifacts)
#   MLPSCALE_MLFLOW_HOST          address to bind (default: the first address of `hostname -I`)
#   MLPSCALE_MLFLOW_PORT          port (default 5000)
#   MLPSCALE_MLFLOW_DIR           state: sqlite store, artifacts, mlflow.pid, mlflow.log (default ~/mlflow)
#   MLPSCALE_MLFLOW_WORKERS       server worker processes (default 2)
#   MLFLOW_BIN                    the mlflow executable (default: the one on PATH)
set -euo pipefail

state_dir="${MLPSCALE_MLFLOW_DIR:-$HOME/mlflow}"
host="${MLPSCALE_MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}"
port="${MLPSCALE_MLFLOW_PORT:-5000}"
backend="${MLPSCALE_MLFLOW_BACKEND_URI:-sqlite:///$state_dir/mlflow.db}"
artifacts="${MLPSCALE_MLFLOW_ARTIFACTS:-$state_dir/artifacts}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
pid_file="$state_dir/mlflow.pid"

if [[ "${1:-start}" == "stop" ]]; then
  if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    kill -- "-$(cat "$pid_file")" && echo "MLflow stopped"
  fi
  rm -f "$pid_file"
  exit 0
fi

mkdir -p "$state_dir"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac

if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "MLflow already running (pid $(cat "$pid_file")) on http://$host:$port"
  exit 0
fi

setsid nohup "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" --serve-artifacts \
  --host "$host" --port "$port" --workers "${MLPSCALE_MLFLOW_WORKERS:-2}" \
  >>"$state_dir/mlflow.log" 2>&1 </dev/null &
echo $! >"$pid_file"

for _ in $(seq 1 120); do
  if curl -fsS "http://$host:$port/health" >/dev/null 2>&1; then
    echo "MLflow up on http://$host:$port (backend ${backend%%:*}, artifacts $artifacts)"
    exit 0
  fi
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "MLflow exited; last lines of $state_dir/mlflow.log:" >&2
    tail -n 20 "$state_dir/mlflow.log" >&2
    exit 1
  fi
  sleep 1
done
echo "MLflow did not answer on http://$host:$port/health within 120 s; see $state_dir/mlflow.log" >&2
exit 1
