#!/usr/bin/env bash
# Stream the job log of one TPU VM worker (tail -F), or copy it here with --fetch.
#
# usage: launch/logs.sh [--fetch] [--dry-run]
#
# Required variables:
#   TPU_NAME    the TPU VM name, e.g. p2o-v4-8
#   ZONE        the TPU zone, e.g. us-central2-b
# Optional:
#   WORKER      worker index, 0 = the process that writes metrics (default: 0); "all" streams every worker's log
#   RUN_NAME    which run's log (default: the latest job's)
#   LOG_LINES   lines of history to show before following (default: 100)
#   DEST_DIR    where --fetch puts the file, named $TPU_NAME-worker$WORKER-$RUN_NAME.log (default: logs)
#   PROJECT     Google Cloud project (default: gcloud's configured project)
#   DRY_RUN=1   same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stream_log() {
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker="$WORKER" \
    --command="$(shell_join tail -n "${LOG_LINES:-100}" -F "$1")"
}

fetch_log() {
  [[ "$WORKER" != all ]] || die "--fetch copies one worker's log; set WORKER to a worker index"
  local dest_dir=${DEST_DIR:-logs}
  run_cmd mkdir -p "$dest_dir"
  tpu_gcloud tpu-vm scp "$TPU_NAME:$1" "$dest_dir/$TPU_NAME-worker$WORKER-${RUN_NAME:-latest}.log" \
    --worker="$WORKER"
}

main() {
  parse_common_args "$@"
  local fetch=0 arg
  for arg in ${ARGS[@]+"${ARGS[@]}"}; do
    [[ "$arg" == --fetch ]] || die "unexpected argument '$arg' (see --help)"
    fetch=1
  done
  require_tpu_vars
  WORKER=${WORKER:-0}
  [[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "WORKER must be a worker index or 'all', got '$WORKER'"
  local log="$REMOTE_LOG_DIR/${RUN_NAME:-latest}.log"
  if ((fetch)); then
    fetch_log "$log"
  else
    stream_log "$log"
  fi
}

main "$@"
