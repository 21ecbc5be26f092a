#!/usr/bin/env bash
# Delete a TPU VM slice, or a queued resource together with its node.
#
#   launch/delete.sh --name NAME --zone ZONE [--queued [--queued-id ID]] [--yes] [--async]
#
# The workdir on GCS is untouched: checkpoints, metrics and the export stay.
#
#   --name NAME          TPU VM (node) name
#   --zone ZONE          its zone
#   --project PROJECT    default: gcloud's configured project
#   --queued             it was created with create.sh --queued: delete the queued resource
#                        (--force: its node goes too)
#   --queued-id ID       the queued resource's id (default: NAME)
#   --yes                no confirmation prompt (gcloud --quiet)
#   --async              return without waiting for the deletion
#   --dry-run            print the gcloud command instead of running it
#   -h, --help           this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QUEUED_ID=''
FLAGS=()

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --queued) QUEUED=1; shift ;;
    --queued-id) need_arg "$@"; QUEUED_ID=$2; shift 2 ;;
    --yes) FLAGS+=(--quiet); shift ;;
    --async) FLAGS+=(--async); shift ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done
require_name_zone
((QUEUED)) || [[ -z $QUEUED_ID ]] || die '--queued-id only applies with --queued'

gcloud_scope
if ((QUEUED)); then
  run_or_print gcloud compute tpus queued-resources delete "${QUEUED_ID:-$NAME}" "${SCOPE[@]}" \
    --force ${FLAGS[@]+"${FLAGS[@]}"}
else
  run_or_print gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" ${FLAGS[@]+"${FLAGS[@]}"}
fi
