#!/usr/bin/env bash
# performance_test.sh MODE [REQUESTS] [CONCURRENCY] [options]: load-test a running server with locust.
#   load        steady traffic: REQUESTS (default 200) from CONCURRENCY (default 4) clients
#   throughput  as many items/s as the server gives: default 500 requests, 16 clients
#   stress      more clients than MAX_QUEUE_SIZE admits (default: 2 x queue + 8): refusals
#               must be fast 503s, never timeouts or 500s
#   latency     one client, one request at a time: default 100 requests
# Options:
#   --url URL            server or nginx (default http://127.0.0.1:$PORT)
#   --min-success PCT    fail under this success rate (default 99)
#   --max-p95-ms MS      fail when p95 latency of successful requests is above (default: no limit)
#   --tasks KIND         rerank | embed | mixed (default mixed: 3 rerank to 1 embed; rerank only
#                        when the model cannot embed)
#   --docs N             documents (or texts) per request (default 10, 20-60 words each)
#   --api-key KEY        sent as "Authorization: Bearer KEY" (default: $RERANKER_API_KEY)
# Writes locust's CSV (its final statistics) and HTML report and summary.json under perf_results/<timestamp>-MODE/
# ($PERF_RESULTS_ROOT instead of perf_results when set).
# Exit codes: 0 pass, 1 a threshold failed, 2 usage or no server ready at the URL.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")" && pwd)
export REPO_ROOT
# shellcheck source=scripts/venv.sh
. "$REPO_ROOT/scripts/venv.sh"
load_env_file

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

mode=${1:-}
case "$mode" in load | throughput | stress | latency) shift ;; *) usage ;; esac
requests="" concurrency=""
[[ "${1:-}" =~ ^[0-9]+$ ]] && { requests=$1; shift; }
[[ "${1:-}" =~ ^[0-9]+$ ]] && { concurrency=$1; shift; }
url="http://127.0.0.1:${PORT:-8000}" min_success=99 max_p95="" tasks=mixed docs=10
api_key=${RERANKER_API_KEY:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --url) url=${2:?}; shift 2 ;;
        --min-success) min_success=${2:?}; shift 2 ;;
        --max-p95-ms) max_p95=${2:?}; shift 2 ;;
        --tasks) tasks=${2:?}; shift 2 ;;
        --docs) docs=${2:?}; shift 2 ;;
        --api-key) api_key=${2:?}; shift 2 ;;
        *) usage ;;
    esac
done
case "$tasks" in rerank | embed | mixed) ;; *) usage ;; esac
url=${url%/}

ensure_venv "$REPO_ROOT/requirements-dev.txt"
python="$VENV_DIR/bin/python"

export RERANKER_API_KEY=$api_key  # locustfile.py sends it; a 401 is reported as such
read -r max_queue can_embed < <("$python" - "$url" <<'PY'
import json, sys, urllib.error, urllib.request
url = sys.argv[1]
try:  # /health is open to probes: no key needed
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        health = json.loads(response.read())
except urllib.error.HTTPError as exc:
    sys.exit(f"no server ready at {url}: /health answered {exc.code}")
except Exception as exc:  # noqa: BLE001
    sys.exit(f"no server ready at {url}: {exc}")
can_embed = "embed" in (health.get("model") or {}).get("capabilities", [])
print(health.get("controller", {}).get("max_queue_size", 64), int(can_embed))
PY
) && [ -n "${can_embed:-}" ] || exit 2

case "$mode" in
    load) requests=${requests:-200} concurrency=${concurrency:-4} ;;
    throughput) requests=${requests:-500} concurrency=${concurrency:-16} ;;
    stress) concurrency=${concurrency:-$((2 * max_queue + 8))} requests=${requests:-$((10 * concurrency))} ;;
    latency) requests=${requests:-100} concurrency=${concurrency:-1} ;;
esac

results="${PERF_RESULTS_ROOT:-$REPO_ROOT/perf_results}/$(date +%Y%m%d-%H%M%S)-$mode"
mkdir -p "$results"
echo "performance_test.sh $mode: $requests requests, concurrency $concurrency, $docs texts each, $url"

set +e
PERF_MODE=$mode PERF_REQUESTS=$requests PERF_DOCS=$docs PERF_TASKS=$tasks PERF_RESULTS_DIR=$results \
PERF_MIN_SUCCESS=$min_success PERF_MAX_P95_MS=$max_p95 PERF_CAN_EMBED=$can_embed \
    "$VENV_DIR/bin/locust" -f "$REPO_ROOT/locustfile.py" --headless --host "$url" \
    --users "$concurrency" --spawn-rate "$concurrency" --run-time "$((60 + requests * 2))s" \
    --stop-timeout 60 --html "$results/report.html" --only-summary \
    >"$results/locust.log" 2>&1
status=$?
set -e
if [ ! -f "$results/summary.txt" ]; then
    echo "locust did not finish; see $results/locust.log" >&2
    tail -20 "$results/locust.log" >&2
    exit 1
fi
cat "$results/summary.txt"
echo "results: $results (locust_stats.csv, report.html, summary.json)"
exit "$status"
