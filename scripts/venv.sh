# Sourced by start_reranker.sh and run_tests.sh: create .venv and install a requirements
# file once; later runs skip the install until the file changes.
# shellcheck shell=bash

REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV_DIR=${VENV_DIR:-$REPO_ROOT/.venv}
PYTHON_BIN=${PYTHON_BIN:-python3}

ensure_venv() {
    local requirements=${1:-$REPO_ROOT/requirements.txt}
    local stamp="$VENV_DIR/.installed-$(basename "$requirements")"
    local want
    want=$(cat "$REPO_ROOT"/requirements*.txt | sha256sum | cut -d' ' -f1)
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        echo "creating virtualenv in $VENV_DIR" >&2
        "$PYTHON_BIN" -m venv "$VENV_DIR"
        "$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip >&2
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing $(basename "$requirements") into $VENV_DIR (first run only)" >&2
        "$VENV_DIR/bin/python" -m pip install --quiet -r "$requirements" >&2
        echo "$want" > "$stamp"
    fi
}

load_env_file() {
    local file=${ENV_FILE:-$REPO_ROOT/.env}
    if [ -f "$file" ]; then
        set -a
        # shellcheck disable=SC1090
        . "$file"
        set +a
    fi
}
