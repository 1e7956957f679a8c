#!/usr/bin/env bash
# Run one shell command on every worker of a TPU VM (e.g. to stage a model or data set on each worker's disk).
#
# usage: launch/ssh_all.sh [--dry-run] [--] COMMAND...
#   e.g. launch/ssh_all.sh 'mkdir -p ~/models && gcloud storage cp -r gs://my-bucket/models/Qwen3-4B ~/models/'
#
# The words of COMMAND are joined with spaces and run by the remote shell, so quote the command as one argument.
#
# Required variables:
#   TPU_NAME    the TPU VM name, e.g. p2o-v4-8
#   ZONE        the TPU zone, e.g. us-central2-b
# Optional:
#   WORKER      worker index or "all" (default: all)
#   PROJECT     Google Cloud project (default: gcloud's configured project)
#   DRY_RUN=1   same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  parse_common_args "$@"
  ((${#ARGS[@]} > 0)) || die "no COMMAND given (see --help)"
  require_tpu_vars
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker="${WORKER:-all}" --command="${ARGS[*]}"
}

main "$@"
