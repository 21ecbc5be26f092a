#!/usr/bin/env bash
# Create a Cloud TPU VM slice, directly or as a queued resource.
#
#   launch/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS]
#
#   --name NAME              TPU VM (node) name; the other scripts take the same name
#   --zone ZONE              e.g. us-east5-a (v5p), us-west4-a (v5e)
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  e.g. v5p-64, v5litepod-64, v6e-64
#   --version VERSION        TPU software version; default from the type: v5p -> v2-alpha-tpuv5,
#                            v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e,
#                            v4 -> tpu-ubuntu2204-base
#   --spot                   Spot capacity (preemptible, no 24 h limit)
#   --preemptible            legacy preemptible TPU VM (not with --queued)
#   --queued                 request it as a queued resource (waits for capacity)
#   --queued-id ID           the queued resource's id (default: NAME)
#   --valid-until DURATION   queued: give up if not provisioned within e.g. 6h
#   --dry-run                print the gcloud command instead of running it
#   -h, --help               this text
#   -- GCLOUD_FLAGS          passed to gcloud as is (e.g. --reserved, --network=N)
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCEL=''
VERSION=''
SPOT=0
PREEMPTIBLE=0
QUEUED=0
QUEUED_ID=''
VALID_UNTIL=''
EXTRA=()

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --accelerator-type) need_arg "$@"; ACCEL=$2; shift 2 ;;
    --version) need_arg "$@"; VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --queued-id) need_arg "$@"; QUEUED_ID=$2; shift 2 ;;
    --valid-until) need_arg "$@"; VALID_UNTIL=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done

require_name_zone
[[ -n $ACCEL ]] || die 'missing --accelerator-type (e.g. v5p-64 or v5litepod-64); see --help'
if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator type '$ACCEL'; pass --version" ;;
  esac
fi
((SPOT && PREEMPTIBLE)) && die '--spot and --preemptible exclude each other; --spot is the newer'
((QUEUED && PREEMPTIBLE)) && die '--preemptible is not offered for queued resources; use --spot'
((QUEUED)) || [[ -z $QUEUED_ID && -z $VALID_UNTIL ]] ||
  die '--queued-id and --valid-until only apply with --queued'

gcloud_scope
if ((QUEUED)); then
  cmd=(gcloud compute tpus queued-resources create "${QUEUED_ID:-$NAME}" --node-id="$NAME"
    "${SCOPE[@]}" --accelerator-type="$ACCEL" --runtime-version="$VERSION")
  [[ -z $VALID_UNTIL ]] || cmd+=(--valid-until-duration="$VALID_UNTIL")
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" --accelerator-type="$ACCEL"
    --version="$VERSION")
  ((PREEMPTIBLE)) && cmd+=(--preemptible)
fi
((SPOT)) && cmd+=(--spot)
run_or_print "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

if ((QUEUED && !DRY_RUN)); then
  echo "$PROG: queued; watch it with: $(quote gcloud compute tpus queued-resources describe \
    "${QUEUED_ID:-$NAME}" "${SCOPE[@]}")" >&2
fi
