#!/usr/bin/env bash
# Stream a worker's run log (worker 0 by default); Ctrl-C stops watching, never the run.
#
#   launch/logs.sh --name NAME --zone ZONE [--worker N] [--lines N] [--no-follow]
#
#   --name NAME          TPU VM (node) name
#   --zone ZONE          its zone
#   --project PROJECT    default: gcloud's configured project
#   --worker N           which worker's log (default 0, the one that writes metrics and reports)
#   --lines N            start this many lines back (default 100)
#   --no-follow          print them and exit instead of streaming
#   --remote-dir DIR     on each worker, relative to the home directory (default idea_prune_jax)
#   --dry-run            print the gcloud command instead of running it
#   -h, --help           this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LINES=100
FOLLOW=(-F)

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --worker) need_arg "$@"; WORKER=$2; shift 2 ;;
    --lines) need_arg "$@"; LINES=$2; shift 2 ;;
    --no-follow) FOLLOW=(); shift ;;
    --remote-dir) need_arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done
require_name_zone
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER': a worker index (0, 1, ...)"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number of lines"

ssh_workers "$WORKER" "$(remote tail -n "$LINES" ${FOLLOW[@]+"${FOLLOW[@]}"} \
  "$REMOTE_DIR/logs/run.log")"
