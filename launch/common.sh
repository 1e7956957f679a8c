# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source this file
# Shared helpers for the launch/*.sh scripts (sourced, never run): one-line errors, required-variable checks, the
# --help / --dry-run handling, and the gcloud wrapper that prints instead of running in dry-run mode.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
# Where the project and the job logs live on every TPU VM worker, relative to the remote home directory (ssh and scp
# start there; a relative path also survives shell quoting, which a "~" would not).
REMOTE_DIR=${REMOTE_DIR:-p2o_jax}
REMOTE_LOG_DIR=p2o_jax_logs

die() {
  echo "error: $*" >&2
  exit 1
}

# The calling script's header comment (from line 2 to the first non-comment line) is its usage text.
print_usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# require_var NAME DESCRIPTION: exits with a one-line error naming the variable when it is unset or empty.
require_var() {
  [[ -n "${!1:-}" ]] || die "$1 is not set ($2)"
}

# is_on NAME: true when the switch variable is 1, false when it is unset, empty or 0, an error for anything else.
is_on() {
  case "${!1:-0}" in
    1) return 0 ;;
    0 | "") return 1 ;;
    *) die "$1 must be 0 or 1, got '${!1}'" ;;
  esac
}

# parse_common_args "$@": handles --help and --dry-run (anywhere) and "--" (ends our options); every other argument
# is left, in order, in ARGS for the script to interpret.
parse_common_args() {
  ARGS=()
  while (($#)); do
    case "$1" in
      -h | --help) print_usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# no_extra_args: for scripts that take no positional arguments, so a typo is not silently ignored.
no_extra_args() {
  ((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (see --help)"
}

# shell_join WORD...: the words as one shell-quoted command line (what a remote shell will split back into WORD...).
shell_join() {
  local joined
  printf -v joined '%q ' "$@"
  printf '%s' "${joined% }"
}

# run_cmd CMD ARG...: runs the command, or in dry-run mode prints it as "+ CMD ARG..." (shell-quoted) on stdout.
run_cmd() {
  if is_on DRY_RUN; then
    echo "+ $(shell_join "$@")"
  else
    "$@"
  fi
}

run_gcloud() {
  if ! is_on DRY_RUN && ! command -v gcloud >/dev/null; then
    die "gcloud is not on PATH (install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install)"
  fi
  run_cmd gcloud "$@"
}

# tpu_gcloud ARG...: `gcloud compute tpus ARG...` in $ZONE (and $PROJECT when set).
tpu_gcloud() {
  run_gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

# The variables every script that talks to an existing TPU VM needs.
require_tpu_vars() {
  require_var TPU_NAME "the TPU VM name, e.g. p2o-v4-8"
  require_var ZONE "the TPU zone, e.g. us-central2-b"
}
