#!/usr/bin/env bash
# Keep a run going on Spot / queued-resource capacity until its report is in the bucket.
#
#   launch/supervise.sh --name NAME --zone ZONE --accelerator-type TYPE \
#       --workdir gs://BUCKET/DIR [options] [--config.a.b=v ...] [-- MORE_IDEA_PRUNE_ARGS]
#
# Every --poll seconds: done once WORKDIR/report.json exists (compare: compare.json); else reads
# the slice's state (queued-resources describe, or tpu-vm describe). Preempted, suspended,
# failed or gone: deletes it, creates it again (create.sh), and once it is up runs setup.sh and
# the same run.sh command, which resumes from the workdir's latest checkpoint. Up, but the run
# ended without a report (it crashed, or stopped on SIGTERM before the slice went): starts it
# again. Gives up after --max-restarts. Run it where it can outlive your laptop (tmux, a small VM).
#
#   --name NAME              TPU VM (node) name
#   --zone ZONE              its zone
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  e.g. v5p-64 (create.sh: also --version, --spot)
#   --version VERSION        TPU software version (default: create.sh's for the type)
#   --spot                   Spot capacity
#   --queued                 a queued resource (create.sh --queued); --queued-id ID its id
#   --queued-id ID           the queued resource's id (default: NAME)
#   --workdir gs://B/DIR     the run's workdir, a bucket path
#   --config FILE            as run.sh (default configs/paper_2p8b_to_1p3b.py)
#   --mode MODE              run (default) or compare: what writes the report waited for
#   --env VAR=VALUE          as run.sh (repeatable)
#   --jax SPEC               as setup.sh
#   --data-bucket B          as setup.sh: mount gs://B read-only at /mnt/B on every worker
#   --poll SECONDS           between checks (default 60)
#   --max-restarts N         slice recreations plus run restarts before giving up (default 20)
#   --dry-run                print the commands of one recovery (describe, ls, delete, create,
#                            setup, run) instead of running anything
#   -h, --help               this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HERE=$(dirname "${BASH_SOURCE[0]}")
ACCEL=''
QUEUED=0
QUEUED_ID=''
WORKDIR=''
MODE=run
POLL=60
MAX_RESTARTS=20
CREATE=()
SETUP=()
RUN=()

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --accelerator-type) need_arg "$@"; ACCEL=$2; CREATE+=("$1" "$2"); shift 2 ;;
    --version) need_arg "$@"; CREATE+=("$1" "$2"); shift 2 ;;
    --spot) CREATE+=("$1"); shift ;;
    --queued) QUEUED=1; CREATE+=("$1"); shift ;;
    --queued-id) need_arg "$@"; QUEUED_ID=$2; CREATE+=("$1" "$2"); shift 2 ;;
    --workdir) need_arg "$@"; WORKDIR=$2; shift 2 ;;
    --config | --env) need_arg "$@"; RUN+=("$1" "$2"); shift 2 ;;
    --mode) need_arg "$@"; MODE=$2; shift 2 ;;
    --config.*=*) RUN+=("$1"); shift ;;
    --config.*) die "write config overrides as one word, $1=VALUE" ;;
    --jax | --data-bucket) need_arg "$@"; SETUP+=("$1" "$2"); shift 2 ;;
    --poll) need_arg "$@"; POLL=$2; shift 2 ;;
    --max-restarts) need_arg "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --) RUN+=("$@"); break ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done
require_name_zone
[[ -n $ACCEL ]] || die 'missing --accelerator-type (to recreate the slice); see --help'
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir '$WORKDIR' must be gs://BUCKET/DIR: the report is looked for there"
case $MODE in
  run) DONE_FILE=report.json ;;
  compare) DONE_FILE=compare.json ;;
  *) die "--mode '$MODE': use run or compare (train writes no report to wait for)" ;;
esac
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll '$POLL': a number of seconds"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts '$MAX_RESTARTS': a whole number"

SCOPED=(--name "$NAME" --zone "$ZONE")
[[ -z $PROJECT ]] || SCOPED+=(--project "$PROJECT")
DRY=()
((DRY_RUN)) && DRY=(--dry-run)
gcloud_scope

say() {
  printf '%s: %s %s\n' "$PROG" "$(date -u +%FT%TZ)" "$*" >&2
}

LS=(gcloud storage ls "${WORKDIR%/}/$DONE_FILE")
if ((QUEUED)); then
  DESCRIBE=(gcloud compute tpus queued-resources describe "${QUEUED_ID:-$NAME}" "${SCOPE[@]}"
    --format='value(state.state)')
else
  DESCRIBE=(gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" --format='value(state)')
fi

# ACTIVE / READY when up; PREEMPTED, SUSPENDED, FAILED, ... or NOT_FOUND when it must be remade.
slice_state() {
  local state
  state=$("${DESCRIBE[@]}" 2>/dev/null) || state=NOT_FOUND
  printf '%s\n' "${state:-NOT_FOUND}"
}

run_alive() {
  gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=0 \
    --command "$(remote bash "$REMOTE_DIR/launch/worker.sh" status)" 2>/dev/null |
    grep -q 'running (pid'
}

recreate() {
  local del=("${SCOPED[@]}" --yes)
  if ((QUEUED)); then
    del+=(--queued)
    [[ -z $QUEUED_ID ]] || del+=(--queued-id "$QUEUED_ID")
  fi
  bash "$HERE/delete.sh" ${DRY[@]+"${DRY[@]}"} "${del[@]}" || true  # already gone is fine
  bash "$HERE/create.sh" ${DRY[@]+"${DRY[@]}"} "${SCOPED[@]}" "${CREATE[@]}"
}

start_run() {
  bash "$HERE/run.sh" ${DRY[@]+"${DRY[@]}"} "${SCOPED[@]}" --workdir "$WORKDIR" --mode "$MODE" \
    ${RUN[@]+"${RUN[@]}"}
}

if ((DRY_RUN)); then
  quote "${LS[@]}"
  quote "${DESCRIBE[@]}"
  recreate
  bash "$HERE/setup.sh" --dry-run "${SCOPED[@]}" ${SETUP[@]+"${SETUP[@]}"}
  start_run
  exit 0
fi

started=0
restarts=0
while :; do
  if "${LS[@]}" >/dev/null 2>&1; then
    say "done: ${WORKDIR%/}/$DONE_FILE exists"
    exit 0
  fi
  state=$(slice_state)
  case $state in
    ACTIVE | READY)
      if ((!started)); then
        say "slice $state: setup, then the run"
        bash "$HERE/setup.sh" "${SCOPED[@]}" ${SETUP[@]+"${SETUP[@]}"}
        start_run
        started=1
      elif ! run_alive; then
        restarts=$((restarts + 1))
        ((restarts <= MAX_RESTARTS)) || die "the run stopped $restarts times without a report"
        say "slice $state, run not running and no report: starting it again ($restarts)"
        start_run
      fi
      ;;
    PREEMPTED | SUSPENDED | SUSPENDING | FAILED | TERMINATED | STOPPED | NOT_FOUND)
      restarts=$((restarts + 1))
      ((restarts <= MAX_RESTARTS)) || die "slice $state again after $MAX_RESTARTS restarts"
      say "slice $state: recreating it ($restarts)"
      recreate
      started=0
      ;;
    *) say "slice $state: waiting" ;;
  esac
  sleep "$POLL"
done
