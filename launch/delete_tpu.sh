#!/usr/bin/env bash
# Delete a TPU VM, or with QUEUED=1 a queued resource together with its TPU VM. Asks first unless --yes / YES=1.
#
# usage: launch/delete_tpu.sh [--yes] [--dry-run]
#
# Whatever is only on the VM's disks (a local WORKDIR, staged models and data, the job logs) is deleted with it.
#
# Required variables:
#   TPU_NAME         the TPU VM name, e.g. p2o-v4-8
#   ZONE             the TPU zone, e.g. us-central2-b
# Optional:
#   QUEUED=1         delete the queued resource (created with QUEUED=1) and its TPU VM
#   QUEUED_RESOURCE  the queued resource name (default: $TPU_NAME-qr)
#   YES=1            same as --yes: do not ask for confirmation
#   PROJECT          Google Cloud project (default: gcloud's configured project)
#   DRY_RUN=1        same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

confirm() {
  local answer=""
  read -r -p "$1 [y/N] " answer || true  # end of input counts as "no"
  [[ "$answer" =~ ^[Yy](es)?$ ]] || die "not confirmed, nothing deleted (--yes or YES=1 skips the question)"
}

main() {
  parse_common_args "$@"
  local arg
  for arg in ${ARGS[@]+"${ARGS[@]}"}; do
    [[ "$arg" == --yes ]] || die "unexpected argument '$arg' (see --help)"
    # shellcheck disable=SC2034  # read by name: is_on YES
    YES=1
  done
  require_tpu_vars
  local queued_resource=${QUEUED_RESOURCE:-$TPU_NAME-qr} what="TPU VM $TPU_NAME"
  is_on QUEUED && what="queued resource $queued_resource and its TPU VM $TPU_NAME"
  if ! is_on YES && ! is_on DRY_RUN; then
    confirm "Delete $what in $ZONE?"
  fi
  # --quiet: the question was asked above; gcloud would ask again.
  if is_on QUEUED; then
    tpu_gcloud queued-resources delete "$queued_resource" --force --quiet
  else
    tpu_gcloud tpu-vm delete "$TPU_NAME" --quiet
  fi
}

main "$@"
