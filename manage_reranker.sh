#!/usr/bin/env bash
# manage_reranker.sh [--json] COMMAND [PORT...]: run and watch several server instances.
#   start [PORT...]      start daemons (default: $PORT), wait until each is ready
#   stop [PORT...]       SIGTERM (graceful drain), SIGKILL only after STOP_TIMEOUT_S (default: all known)
#   restart [PORT...]    stop, then start
#   status [PORT...]     PID, port, uptime, health, backend/device of each instance
#   health [PORT...]     one health word per instance
#   tail [PORT...]       follow the log files
#   cluster-start N      N instances on consecutive ports from $PORT; with N > 1 jobs must be
#                        shared (JOB_BACKEND=redis, REDIS_URL) unless --local-jobs says they need not
#   cluster-stop         stop every instance that has a PID file under $RUN_DIR
# PID files live in $RUN_DIR (default ./run), logs in $LOG_DIR (default ./logs).
# Exit codes: 0 ok, 1 failed or unhealthy, 2 usage, 3 an instance is down.
# Settings come from the environment or an optional .env file (see ENV_VARS_QUICK_REF.md).
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")" && pwd)
export REPO_ROOT
# shellcheck source=scripts/venv.sh
. "$REPO_ROOT/scripts/venv.sh"
load_env_file

command_name=""
for arg in "$@"; do
    case "$arg" in --*) ;; *) command_name=$arg; break ;; esac
done
case "$command_name" in
    start | restart | cluster-start)
        ensure_venv "$REPO_ROOT/requirements.txt"
        export RERANKER_PYTHON="$VENV_DIR/bin/python"
        ;;
esac
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Status and stop need only the standard library: they work before the virtualenv exists.
manager_python="$VENV_DIR/bin/python"
[ -x "$manager_python" ] || manager_python=$PYTHON_BIN
cd "$REPO_ROOT"
exec "$manager_python" -m reranker.ops.manage "$@"
