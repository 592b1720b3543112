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
        echo "creating virtualenv in $VENV_DIR (then installing the requirements: minutes, once)" >&2
        "$PYTHON_BIN" -m venv "$VENV_DIR"
        "$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip >&2
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing $(basename "$requirements") into $VENV_DIR (first run only; pip's progress follows)" >&2
        # Not --quiet: a first install downloads about a gigabyte (torch) and takes minutes.
        "$VENV_DIR/bin/python" -m pip install -r "$requirements" >&2
        echo "installed $(basename "$requirements") into $VENV_DIR ($(du -sh "$VENV_DIR" | cut -f1))" >&2
        echo "$want" > "$stamp"
        # The files it includes (-r) are installed now too.
        local included
        for included in $(sed -n 's/^-r[[:space:]]*//p' "$requirements"); do
            echo "$want" > "$VENV_DIR/.installed-$(basename "$included")"
        done
    fi
}

# KEY=VALUE lines of $ENV_FILE (default ./.env); variables already in the environment win.
# The file is read, not executed: no command substitution, optional quotes stripped.
load_env_file() {
    local file=${ENV_FILE:-$REPO_ROOT/.env} line key value
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        line=${line#export }
        case "$line" in '' | '#'*) continue ;; esac
        key=${line%%=*}
        value=${line#*=}
        if [[ ! "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ "$key" = "$line" ]; then
            echo "ignoring malformed line in $file: $line" >&2
            continue
        fi
        if [[ "$value" =~ ^\"(.*)\"$ ]] || [[ "$value" =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        [ -n "${!key+set}" ] || export "$key=$value"
    done <"$file"
}
