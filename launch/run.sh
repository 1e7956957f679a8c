#!/usr/bin/env bash
# Start training on every worker of a TPU VM at once (a pod slice runs one process per worker; JAX connects them).
#
# usage: launch/run.sh [--dry-run] [--config.a.b=value ...]
#
# Runs `python -m p2o_jax.main --config $CONFIG --workdir $WORKDIR [overrides]` on all workers through
# launch/remote_job.sh: detached with nohup, so a dropped ssh connection does not end the job, with one log per worker
# at ~/p2o_jax_logs/$RUN_NAME.log on that worker (read it with launch/logs.sh; end the job with launch/stop.sh).
# Arguments other than --dry-run/--help are passed to p2o_jax.main unchanged (put them after "--" to pass those too).
#
# Required variables:
#   TPU_NAME    the TPU VM name, e.g. p2o-v4-8
#   ZONE        the TPU zone, e.g. us-central2-b
#   CONFIG      config file inside the project, e.g. configs/qwen3_4b_deepscaler.py
#   WORKDIR     run directory for checkpoints and metrics; use gs://BUCKET/PATH, which every worker can reach and
#               which outlives the VM (a local path is per worker and lost with the VM)
# Optional:
#   RUN_NAME    log name on the workers (default: the last component of WORKDIR)
#   PROJECT     Google Cloud project (default: gcloud's configured project)
#   REMOTE_DIR  project directory on the workers (default: p2o_jax, as in launch/setup_tpu.sh)
#   DRY_RUN=1   same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  parse_common_args "$@"
  require_tpu_vars
  require_var CONFIG "the config file inside the project, e.g. configs/qwen3_4b_deepscaler.py"
  require_var WORKDIR "the run directory, e.g. gs://my-bucket/runs/p2o_qwen3_4b"
  [[ -f "$REPO_DIR/$CONFIG" ]] || die "CONFIG '$CONFIG' is not a file in $REPO_DIR (give a path inside the project)"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "warning: WORKDIR '$WORKDIR' is not on GCS: each worker writes its own local copy, lost with the VM" >&2
  fi
  local run_name=${RUN_NAME:-$(basename "$WORKDIR")}
  [[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME '$run_name' may only hold letters, digits, '.', '_', '-'"
  local job=(bash "$REMOTE_DIR/launch/remote_job.sh" start "$run_name" "$CONFIG" "$WORKDIR" ${ARGS[@]+"${ARGS[@]}"})
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker=all --command="$(shell_join "${job[@]}")"
}

main "$@"
