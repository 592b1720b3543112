#!/usr/bin/env bash
# run_tests.sh [--fast] [PYTEST ARGS...]: lint and test suite; creates .venv on first run.
# --fast: only the tests that need no real model, server process or system tool (-m "not slow").
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")" && pwd)
export REPO_ROOT
# shellcheck source=scripts/venv.sh
. "$REPO_ROOT/scripts/venv.sh"
ensure_venv "$REPO_ROOT/requirements-dev.txt"
cd "$REPO_ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV_DIR/bin/ruff" check .
"$VENV_DIR/bin/ruff" format --check .
if [ "${1:-}" = "--fast" ]; then
    shift
    set -- -m "not slow" "$@"
fi
exec "$VENV_DIR/bin/python" -m pytest "$@"
