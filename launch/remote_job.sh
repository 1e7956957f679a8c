#!/usr/bin/env bash
# Runs ON a TPU VM worker (launch/run.sh and launch/stop.sh call it on all workers at once): starts the trainer in the
# background, detached from the ssh session, or stops it.
#
# usage: bash launch/remote_job.sh start RUN_NAME CONFIG WORKDIR [OVERRIDE...]
#        bash launch/remote_job.sh stop
#
# start: runs `python -m p2o_jax.main --config CONFIG --workdir WORKDIR OVERRIDE...` in the project directory under
#   nohup, in a process group of its own, appending its output to ~/p2o_jax_logs/RUN_NAME.log (latest.log links to
#   it) and its pid to ~/p2o_jax_logs/latest.pid. Refuses while the previous job still runs: one process owns a TPU.
# stop: ends the latest job's process group (the trainer and its verifier worker processes).
#
# Optional variables:
#   P2O_PYTHON  the interpreter (default: <project>/.venv/bin/python, made by launch/remote_install.sh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly LOG_DIR="$HOME/$REMOTE_LOG_DIR"

# Prints the pid of the latest job and succeeds when that job is still running. Matching the command line (not just
# the pid) keeps a reused pid after a reboot from being taken for the job, and skips a dead job not yet reaped.
running_pid() {
  local pid
  [[ -f "$LOG_DIR/latest.pid" ]] || return 1
  pid=$(<"$LOG_DIR/latest.pid")
  [[ "$(ps -o args= -p "$pid" 2>/dev/null)" == *" -m p2o_jax.main "* ]] && echo "$pid"
}

start_job() {
  (($# >= 3)) || die "start needs RUN_NAME CONFIG WORKDIR [OVERRIDE...]"
  local run_name=$1 config=$2 workdir=$3 pid
  shift 3
  local python=${P2O_PYTHON:-$REPO_DIR/.venv/bin/python}
  [[ -x "$python" ]] || die "no Python interpreter at $python; run launch/setup_tpu.sh first"
  if pid=$(running_pid); then
    die "a job is still running on $(hostname) (pid $pid, log ~/$REMOTE_LOG_DIR/latest.log); end it with launch/stop.sh"
  fi
  local command=("$python" -m p2o_jax.main --config "$config" --workdir "$workdir" "$@")
  local log="$LOG_DIR/$run_name.log"
  mkdir -p "$LOG_DIR"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $(shell_join "${command[@]}")" >>"$log"
  cd "$REPO_DIR"
  # A background job of a non-interactive shell is no group leader, so setsid makes $! the leader of a new group
  # (stop ends the whole group); nohup and the redirections let the job outlive the ssh session.
  setsid nohup "${command[@]}" >>"$log" 2>&1 </dev/null &
  echo "$!" >"$LOG_DIR/latest.pid"
  ln -sfn "$run_name.log" "$LOG_DIR/latest.log"
  echo "$(hostname): started pid $!, log ~/$REMOTE_LOG_DIR/$run_name.log"
}

stop_job() {
  local pid
  if ! pid=$(running_pid); then
    echo "$(hostname): no job running"
    return 0
  fi
  kill -TERM -- "-$pid"
  echo "$(hostname): sent SIGTERM to the job's process group $pid"
}

main() {
  parse_common_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  case "${1:-}" in
    start) shift; start_job "$@" ;;
    stop) shift; (($# == 0)) || die "stop takes no arguments"; stop_job ;;
    *) die "expected 'start' or 'stop' as the first argument (see --help)" ;;
  esac
}

main "$@"
