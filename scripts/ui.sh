#!/usr/bin/env bash
# `make ui`: the Prefect UI (http://127.0.0.1:4200), the MLflow UI (http://127.0.0.1:5000) and the served flow
# deployment `longtail-pipeline/longtail`, all offline. Ctrl-C stops everything.
#
# Trigger a run: Prefect UI → Deployments → longtail-pipeline / longtail → Run ▸ Custom run → fill overrides /
# targets / force / max_parallel → Submit. Or from a shell:
#   PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'longtail-pipeline/longtail' \
#       -p overrides='["dataset=digits_lt"]' -p targets='["evaluate"]'
#
# Env: PREFECT_PORT (4200), MLFLOW_PORT (5000), PYTHON (.venv/bin/python), PREFECT_HOME (<repo>/.prefect).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
LOG_DIR="$ROOT/.prefect/logs"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$PY"):$PATH"           # `dvc`, `prefect`, `mlflow` of the same environment
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false  # no telemetry heartbeat (offline: it only logs errors)
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
mkdir -p "$LOG_DIR"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
  if port_in_use "$port"; then
    echo "ui.sh: port $port is already in use (another \`make ui\`?). Stop it or set PREFECT_PORT / MLFLOW_PORT." >&2
    exit 1
  fi
done

# The MLflow store is created once, before the servers or any stage open it (concurrent first use corrupts it).
"$PY" -c "import sys; from pipeline.tracking import init_store; print('MLflow store:', init_store(sys.argv[1]))" "$ROOT"

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  echo "ui.sh: stopping the flow server and the UIs" >&2
  local pid t
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true  # whole group: workers too
  done
  for t in $(seq 20); do  # 10 s grace, then SIGKILL what is left
    for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && break; pid=""; done
    [[ -z "${pid:-}" ]] && break
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# setsid: each server leads its own process group, so cleanup can stop its workers with it.
setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$LOG_DIR/prefect-server.log" 2>&1 &
PIDS+=("$!")
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no huey job consumers (7 processes, for GenAI jobs this project never uses).
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server --backend-store-uri "sqlite:///$ROOT/mlflow.db" --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --workers 1 >"$LOG_DIR/mlflow-server.log" 2>&1 &
PIDS+=("$!")

wait_healthy() {  # name url log pid
  local deadline=$((SECONDS + 120))
  until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; do
    if ! kill -0 "$4" 2>/dev/null; then
      echo "ui.sh: $1 exited; last lines of $3:" >&2
      tail -n 30 "$3" >&2
      exit 1
    fi
    if ((SECONDS > deadline)); then
      echo "ui.sh: $1 not healthy after 120 s; see $3" >&2
      exit 1
    fi
    sleep 1
  done
  echo "ui.sh: $1 is up"
}
wait_healthy "Prefect server" "$PREFECT_API_URL/health" "$LOG_DIR/prefect-server.log" "${PIDS[0]}"
wait_healthy "MLflow server" "http://127.0.0.1:${MLFLOW_PORT}/health" "$LOG_DIR/mlflow-server.log" "${PIDS[1]}"

cat <<EOF

  Prefect UI : http://127.0.0.1:${PREFECT_PORT}   (Deployments → longtail-pipeline / longtail → Run → Custom run)
  MLflow UI  : http://127.0.0.1:${MLFLOW_PORT}/#/experiments?workflowType=machine_learning    (experiment longtail-pipeline; stage runs nested under each pipeline run)
  Logs       : $LOG_DIR

EOF

# Registers the deployment and runs triggered flow runs in subprocesses until Ctrl-C. It runs in the background and
# the script waits on it, so a SIGTERM/SIGINT to this script reaches the trap at once.
setsid "$PY" -m pipeline.flow serve &
PIDS+=("$!")
wait "${PIDS[2]}"
