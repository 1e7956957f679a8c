#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), directly or as a queued resource.
#
# usage: launch/create_tpu.sh [--dry-run]
#
# Required variables:
#   TPU_NAME          the TPU VM name, e.g. p2o-v4-8
#   ZONE              the TPU zone, e.g. us-central2-b
#   ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-8, v5p-32, v6e-8
# Optional:
#   RUNTIME_VERSION   TPU software version; default by family: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
#                     v5litepod/v5e -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   SPOT=1            Spot VM (cheap, can be preempted at any time)
#   PREEMPTIBLE=1     preemptible VM (direct creation only; queued resources take SPOT=1)
#   QUEUED=1          request a queued resource (waits in the queue for capacity) instead of creating at once
#   QUEUED_RESOURCE   the queued resource name (default: $TPU_NAME-qr); its node is named $TPU_NAME
#   DRY_RUN=1         same as --dry-run: print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The documented PyTorch/JAX runtime for each TPU generation (cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE '$1'; set RUNTIME_VERSION" ;;
  esac
}

create_vm() {
  local provisioning=()
  is_on SPOT && provisioning+=(--spot)
  is_on PREEMPTIBLE && provisioning+=(--preemptible)
  tpu_gcloud tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${provisioning[@]+"${provisioning[@]}"}
}

create_queued_resource() {
  is_on PREEMPTIBLE && die "PREEMPTIBLE=1 does not apply to queued resources; use SPOT=1"
  local provisioning=()
  is_on SPOT && provisioning+=(--spot)
  tpu_gcloud queued-resources create "${QUEUED_RESOURCE:-$TPU_NAME-qr}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${provisioning[@]+"${provisioning[@]}"}
}

main() {
  parse_common_args "$@"
  no_extra_args
  require_tpu_vars
  require_var ACCELERATOR_TYPE "the TPU type and size, e.g. v4-8 or v5litepod-8"
  if is_on SPOT && is_on PREEMPTIBLE; then
    die "SPOT=1 and PREEMPTIBLE=1 are exclusive; choose one"
  fi
  RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
  if is_on QUEUED; then
    create_queued_resource
    echo "queued; watch it with: gcloud compute tpus queued-resources describe ${QUEUED_RESOURCE:-$TPU_NAME-qr}" \
      "--zone=$ZONE (ready when ACTIVE)" >&2
  else
    create_vm
  fi
}

main "$@"
