#!/usr/bin/env bash
# start_reranker.sh MODE: run the reranker server.
#   dev   foreground, auto-reload on code change, logs to the terminal
# Settings come from the environment or an optional .env file (see ENV_VARS_QUICK_REF.md).
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")" && pwd)
export REPO_ROOT
# shellcheck source=scripts/venv.sh
. "$REPO_ROOT/scripts/venv.sh"

usage() {
    echo "usage: $0 dev" >&2
    exit 64
}

mode=${1:-}
case "$mode" in
    dev)
        ensure_venv "$REPO_ROOT/requirements.txt"
        load_env_file
        cd "$REPO_ROOT"
        exec "$VENV_DIR/bin/python" -m reranker --reload
        ;;
    *) usage ;;
esac
