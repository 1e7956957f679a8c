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
#   WORKDIR     run directory on the workers' disks, e.g. runs/p2o_qwen3_4b (metrics, report, exported policies;
#               written by worker 0; copy it off with `gcloud compute tpus tpu-vm scp --worker=0 --recurse`)
# Optional:
#   CHECKPOINT_DIR  where orbax checkpoints go, e.g. gs://BUCKET/runs/p2o_qwen3_4b/checkpoints: every worker reaches
#               it and it outlives the VM, so a recreated VM resumes from it (default: $WORKDIR/checkpoints)
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
  require_var WORKDIR "the run directory on the workers, e.g. runs/p2o_qwen3_4b"
  [[ -f "$REPO_DIR/$CONFIG" ]] || die "CONFIG '$CONFIG' is not a file in $REPO_DIR (give a path inside the project)"
  [[ "$WORKDIR" != *://* ]] || die "WORKDIR '$WORKDIR' must be a path on the workers; put checkpoints on GCS with CHECKPOINT_DIR=gs://..."
  if [[ -z "${CHECKPOINT_DIR:-}" ]]; then
    echo "warning: CHECKPOINT_DIR is not set: checkpoints stay on the VM's disk and are lost with it" >&2
  fi
  local run_name=${RUN_NAME:-$(basename "$WORKDIR")}
  [[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME '$run_name' may only hold letters, digits, '.', '_', '-'"
  local overrides=(${CHECKPOINT_DIR:+"--config.train.checkpoint_dir=$CHECKPOINT_DIR"} ${ARGS[@]+"${ARGS[@]}"})
  local job=(bash "$REMOTE_DIR/launch/remote_job.sh" start "$run_name" "$CONFIG" "$WORKDIR" ${overrides[@]+"${overrides[@]}"})
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker=all --command="$(shell_join "${job[@]}")"
}

main "$@"
