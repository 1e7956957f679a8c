#!/usr/bin/env bash
# Copy this project to every worker of a TPU VM and install it there with the TPU extra (pip install -e ".[tpu]").
#
# usage: launch/setup_tpu.sh [--dry-run]
#
# Packs the working tree (uncommitted edits included; .git, runs/, .cache/, .venv/ and build files left out), copies
# it to all workers and unpacks it into ~/$REMOTE_DIR, then runs launch/remote_install.sh on each worker, which makes a
# Python 3.11 virtualenv in ~/$REMOTE_DIR/.venv (TPU VM images ship an older Python) and installs the project into it.
# Run it again after changing the code; unpacking overwrites the previous copy and the install is incremental.
#
# Required variables:
#   TPU_NAME    the TPU VM name, e.g. p2o-v4-8
#   ZONE        the TPU zone, e.g. us-central2-b
# Optional:
#   PROJECT     Google Cloud project (default: gcloud's configured project)
#   REMOTE_DIR  project directory on the workers, relative to the remote home (default: p2o_jax)
#   DRY_RUN=1   same as --dry-run: print the commands instead of running them
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly TARBALL_NAME=p2o_jax_src.tar.gz

pack_working_tree() {
  run_cmd tar -czf "$1" -C "$REPO_DIR" --exclude=./.git --exclude=./runs --exclude=./.cache --exclude=./.venv \
    --exclude=./build --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' .
}

remote_unpack_and_install() {
  printf '%s && %s && %s' \
    "$(shell_join mkdir -p "$REMOTE_DIR")" \
    "$(shell_join tar -xzf "$TARBALL_NAME" -C "$REMOTE_DIR")" \
    "$(shell_join bash "$REMOTE_DIR/launch/remote_install.sh")"
}

main() {
  parse_common_args "$@"
  no_extra_args
  require_tpu_vars
  local staging
  staging=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: $staging is local and gone by the time the EXIT trap runs
  trap "rm -rf '$staging'" EXIT
  pack_working_tree "$staging/$TARBALL_NAME"
  tpu_gcloud tpu-vm scp "$staging/$TARBALL_NAME" "$TPU_NAME:$TARBALL_NAME" --worker=all
  tpu_gcloud tpu-vm ssh "$TPU_NAME" --worker=all --command="$(remote_unpack_and_install)"
}

main "$@"
