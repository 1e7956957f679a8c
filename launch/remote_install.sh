#!/usr/bin/env bash
# Runs ON a TPU VM worker (launch/setup_tpu.sh calls it on all of them): installs this project with the TPU extra
# into a virtualenv at <project>/.venv, the interpreter launch/remote_job.sh starts the trainer with.
#
# usage: bash launch/remote_install.sh
#
# TPU VM images ship the distribution's Python (3.10 on Ubuntu 22.04) and the project needs >= 3.11, so uv (installed
# with pip --user) provides the interpreter. An existing .venv is reused, which makes a re-run after a code change fast.
#
# Optional variables:
#   PYTHON_VERSION  interpreter for a new virtualenv (default: 3.11)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  parse_common_args "$@"
  no_extra_args
  local venv="$REPO_DIR/.venv" uv="$HOME/.local/bin/uv"
  python3 -m pip install --user --quiet --upgrade uv
  [[ -x "$venv/bin/python" ]] || "$uv" venv --python "${PYTHON_VERSION:-3.11}" "$venv"
  "$uv" pip install --python "$venv/bin/python" -e "${REPO_DIR}[tpu]"
  "$venv/bin/python" -c 'import p2o_jax, jax; print("installed p2o_jax with jax", jax.__version__)'
}

main "$@"
