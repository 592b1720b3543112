#!/usr/bin/env bash
# scripts/check_package_install.sh: `pip install .` into a fresh virtualenv gives a working server.
# Installs the checkout into $PKG_VENV (default /tmp/pkg-venv, created anew), starts the `reranker`
# command on the embedded model on a free port from an empty directory (nothing of the checkout on
# its path), waits for /readyz (at most $READY_TIMEOUT_S, default 120 s), sends one
# /v1/embeddings and stops it with SIGTERM. Exit 0 when all of that worked.
# torch comes as run_tests.sh gets it: pip's own configuration (a find-links wheel directory with
# the CPU build where the machine has one); pip's cache is reused.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKG_VENV=${PKG_VENV:-/tmp/pkg-venv}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}

rm -rf "$PKG_VENV"
"$PYTHON_BIN" -m venv "$PKG_VENV"
quiet_pip() { # pip's warnings about index directories that lack a package are noise here
    "$PKG_VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}
quiet_pip install -q --upgrade pip
started=$SECONDS
quiet_pip install -q "$REPO_ROOT"
echo "check_package_install: installed in $((SECONDS - started)) s ($(du -sh "$PKG_VENV" | cut -f1))"

work=$(mktemp -d)
port=$("$PKG_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
cd "$work"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ENV_FILE="$work/absent.env" ONNX_CACHE_DIR="$work/onnx" \
    "$PKG_VENV/bin/reranker" --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
server=$!
cleanup() {
    kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "check_package_install: $1" >&2
    tail -n 40 "$work/server.log" >&2
    exit 1
}

deadline=$((SECONDS + READY_TIMEOUT_S))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ]; do
    kill -0 "$server" 2>/dev/null || fail "the server exited before it was ready"
    [ "$SECONDS" -lt "$deadline" ] || fail "not ready after ${READY_TIMEOUT_S} s"
    sleep 0.5
done
answer=$(curl -sf -H 'content-type: application/json' -d '{"input": ["hello world"]}' "$url/v1/embeddings") \
    || fail "POST /v1/embeddings failed"
"$PKG_VENV/bin/python" -c '
import json, sys
body = json.loads(sys.argv[1])
vector = body["data"][0]["embedding"]
assert len(vector) == 384 and all(isinstance(x, float) for x in vector), body
' "$answer" || fail "unexpected /v1/embeddings answer: ${answer:0:300}"
kill -TERM "$server"
wait "$server" || fail "the server exited $? on SIGTERM"
echo "check_package_install: ok (reranker served /v1/embeddings from $PKG_VENV)"
