#!/usr/bin/env bash
# `make pool`: the pipeline through a Prefect work pool, on one machine: a Prefect server, a `process` work pool
# with the `longtail-stage/run-stage` deployment, N workers (default 2) each in its own git clone of this repository,
# and a local-directory DVC remote they share with this workspace. docs/scale_out.md explains each step.
#
#   scripts/pool.sh                       start everything and wait (Ctrl-C stops it); in another shell:
#       PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m pipeline.flow run --executor pool -j 2
#   scripts/pool.sh -- CMD ARGS...        start everything, run CMD (with PREFECT_API_URL set), stop everything
#
# A pool run pins `git rev-parse HEAD` (commit first: the workers fetch that commit from this repository, their
# `origin`) and is saved as a DVC experiment (`dvc exp show`); the workspace is not touched.
#
# Env: WORKERS (2), POOL (longtail), PREFECT_PORT (4200), POOL_DIR (<repo>/.dvc/tmp/pool: clones, logs),
#      DVC_REMOTE_DIR ($POOL_DIR/remote; any existing default remote of the workspace is used instead),
#      PYTHON (.venv/bin/python), PREFECT_HOME (<repo>/.prefect), OMP_NUM_THREADS (cores / WORKERS),
#      LONGTAIL_HEARTBEAT_S (30: a stage run's heartbeats), LONGTAIL_CRASH_AFTER_S (90: no heartbeat for this long and
#      Prefect's automation marks the run Crashed; the pipeline run sends the stage again, crash_retries times),
#      LONGTAIL_PENDING_AFTER_S (120: a run a worker took but did not start within this long is marked Crashed),
#      LONGTAIL_CHECKPOINT_STORE (<remote>/longtail-checkpoints: where stages push checkpoints to resume elsewhere).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
WORKERS="${WORKERS:-2}"
POOL="${POOL:-longtail}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
POOL_DIR="${POOL_DIR:-$ROOT/.dvc/tmp/pool}"  # ignored by git and by DVC
LOG_DIR="$POOL_DIR/logs"
CORES="$(nproc 2>/dev/null || echo 2)"

export PATH="$(dirname "$PY"):$PATH"           # `dvc`, `prefect` of the same environment
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_PORT}/api}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"  # the workers log to this store
mkdir -p "$LOG_DIR"

dvc() { "$PY" -m dvc "$@"; }

# The DVC remote: the workspace's default remote if it has one, else a local directory.
if ! REMOTE_NAME="$(dvc config core.remote 2>/dev/null)" || [[ -z "$REMOTE_NAME" ]]; then
  REMOTE_NAME=pool
  REMOTE_URL="${DVC_REMOTE_DIR:-$POOL_DIR/remote}"
  mkdir -p "$REMOTE_URL"
  dvc remote add --local --force --default "$REMOTE_NAME" "$REMOTE_URL"
fi
# The URL as the clones must see it, absolute: `dvc remote list` prints a local path relative to the working
# directory (and the config file stores it relative to .dvc/), which means nothing in a clone elsewhere.
REMOTE_URL="$(dvc config "remote.$REMOTE_NAME.url")"
if [[ "$REMOTE_URL" != *://* && "$REMOTE_URL" != /* ]]; then
  REMOTE_URL="$(realpath -m "$REMOTE_URL")"
fi
echo "pool.sh: DVC remote $REMOTE_NAME = $REMOTE_URL"
"$PY" -c "import sys; from pipeline.tracking import init_store; init_store(sys.argv[1])" "$ROOT"

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  echo "pool.sh: stopping the workers and the server" >&2
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

healthy() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$PREFECT_API_URL/health" 2>/dev/null; }
if healthy; then
  echo "pool.sh: using the Prefect server at $PREFECT_API_URL"
else
  setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$LOG_DIR/prefect-server.log" 2>&1 &
  PIDS+=("$!")
  deadline=$((SECONDS + 120))
  until healthy; do
    if ! kill -0 "${PIDS[0]}" 2>/dev/null || ((SECONDS > deadline)); then
      echo "pool.sh: the Prefect server did not start; see $LOG_DIR/prefect-server.log" >&2
      tail -n 20 "$LOG_DIR/prefect-server.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "pool.sh: Prefect server up at $PREFECT_API_URL (UI: ${PREFECT_API_URL%/api})"
fi

# The stage deployment, with flow-run heartbeats, and the automation that marks a stage run Crashed when they stop
# (a lost worker); both idempotent.
"$PY" -m pipeline.flow deploy-stage --pool "$POOL"

# One clone per worker, as on separate machines: its own checkout, its own DVC cache, the shared remote.
for i in $(seq "$WORKERS"); do
  clone="$POOL_DIR/worker-$i"
  if [[ ! -d "$clone/.git" ]]; then
    git clone --quiet "$ROOT" "$clone"
  fi
  git -C "$clone" fetch --quiet origin
  (cd "$clone" && dvc remote add --local --force --default "$REMOTE_NAME" "$REMOTE_URL" \
     && dvc config --local core.analytics false)
  # --limit 1: a clone runs one stage at a time (each checks out the run's commit). PYTHONPATH: the flow's code
  # is imported from the clone (the deployment's entrypoint is the module path pipeline.flow.pool.longtail_stage).
  setsid env -C "$clone" LONGTAIL_WORKER_REPO="$clone" LONGTAIL_WORKER_NAME="worker-$i" PYTHONPATH="$clone" \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((CORES / WORKERS > 0 ? CORES / WORKERS : 1))}" \
    "$PY" -m prefect worker start --pool "$POOL" --type process --limit 1 --name "worker-$i" \
    >"$LOG_DIR/worker-$i.log" 2>&1 &
  PIDS+=("$!")
  echo "pool.sh: worker-$i in $clone (log $LOG_DIR/worker-$i.log)"
done

if [[ "${1:-}" == "--" ]]; then
  shift
  sleep 3  # the workers' first poll
  status=0
  "$@" || status=$?
  exit "$status"
fi
echo "pool.sh: ready. Run: PREFECT_API_URL=$PREFECT_API_URL $PY -m pipeline.flow run --executor pool -j $WORKERS"
wait
