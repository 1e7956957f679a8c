#!/usr/bin/env bash
# Stop the job launch/run.sh started, on every worker (its process group gets SIGTERM; the TPU is free afterwards).
#
# usage: launch/stop.sh [--dry-run]
#
# Required variables:
#   TPU_NAME    the TPU VM name, e.g. p2o-v4-8
#   ZONE        the TPU zone, e.g. us-central2-b
# Optional:
#   PROJECT     Google Cloud project (default: gcloud's configured project)
#   REMOTE_DIR  project directory on the workers (default: p2o_jax)
#   DRY_RUN=1   same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  parse_common_args "$@"
  no_extra_args
  require_tpu_vars
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker=all --command="$(shell_join bash "$REMOTE_DIR/launch/remote_job.sh" stop)"
}

main "$@"
