#!/usr/bin/env bash
# start_reranker.sh MODE: run the reranker server on $PORT.
#   dev       foreground, auto-reload on code change, logs to the terminal
#   daemon    background: PID file in $RUN_DIR (./run), log in $LOG_DIR (./logs); waits until ready
#   restart   stop the daemon on $PORT (graceful drain), then start it again
#   stop      SIGTERM, wait for the drain, SIGKILL only after STOP_TIMEOUT_S
# Settings come from the environment or an optional .env file (see ENV_VARS_QUICK_REF.md).
# For several instances, status and logs, see manage_reranker.sh.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")" && pwd)
export REPO_ROOT
# shellcheck source=scripts/venv.sh
. "$REPO_ROOT/scripts/venv.sh"

usage() {
    echo "usage: $0 dev|daemon|restart|stop" >&2
    exit 2
}

load_env_file
mode=${1:-}
case "$mode" in
    dev)
        ensure_venv "$REPO_ROOT/requirements.txt"
        cd "$REPO_ROOT"
        exec "$VENV_DIR/bin/python" -m reranker --reload
        ;;
    daemon) exec "$REPO_ROOT/manage_reranker.sh" start "${PORT:-8000}" ;;
    restart) exec "$REPO_ROOT/manage_reranker.sh" restart "${PORT:-8000}" ;;
    stop) exec "$REPO_ROOT/manage_reranker.sh" stop "${PORT:-8000}" ;;
    *) usage ;;
esac
