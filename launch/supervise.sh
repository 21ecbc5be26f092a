#!/usr/bin/env bash
# Keep a run going on Spot / queued-resource capacity until its report is in the bucket.
#
#   launch/supervise.sh --name NAME --zone ZONE --accelerator-type TYPE \
#       --workdir gs://BUCKET/DIR [options] [--config.a.b=v ...] [-- MORE_IDEA_PRUNE_ARGS]
#
# Every --poll seconds: done once WORKDIR/report.json exists (compare: compare.json): deletes the
# slice (unless --keep) and exits 0. Else reads the slice's state (queued-resources describe, or
# tpu-vm describe). Preempted, suspended, failed or gone: deletes it, creates it again
# (create.sh), and once it is up runs setup.sh and the same run.sh command, which resumes from the
# workdir's latest checkpoint. Suspending or stopping (the preemption notice, while the run saves
# its checkpoint): waits. A describe that fails for another reason (the API, the network) is
# retried with backoff, never taken for a lost slice. Up, but the run is not going on every
# worker (it crashed, a worker died, it stopped on SIGTERM before the slice went), or no worker's
# log grew for --hang-minutes: stops it on every worker (SIGKILL after --stop-grace) and starts it
# again. No ssh can block it (one to a hung VM never returns): asking the workers and starting
# the run give up after --hang-minutes (10 s to 5 min), setup.sh after the longer of
# --hang-minutes and 10 min, and an ACTIVE slice whose workers no ssh reaches for --hang-minutes
# is recreated. Gives up after --max-restarts. One supervisor per slice: a second one on the
# same --name refuses to start. Run it where it can outlive your laptop (tmux, a small VM).
#
#   --name NAME              TPU VM (node) name
#   --zone ZONE              its zone
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  e.g. v5p-64 (create.sh: also --version, --spot); picks the config's
#                            variant as run.sh does
#   --version VERSION        TPU software version (default: create.sh's for the type)
#   --spot                   Spot capacity
#   --queued                 a queued resource (create.sh --queued); --queued-id ID its id
#   --queued-id ID           the queued resource's id (default: NAME)
#   --workdir gs://B/DIR     the run's workdir, a bucket path
#   --config FILE[:VARIANT]  as run.sh (default configs/paper_2p8b_to_1p3b.py, its TYPE variant)
#   --mode MODE              run (default) or compare: what writes the report waited for
#   --env VAR=VALUE          as run.sh (repeatable)
#   --jax SPEC               as setup.sh
#   --data-bucket B          as setup.sh: mount gs://B read-only at /mnt/B on every worker
#   --sync-only              as setup.sh: only copy the code (the image already has the venv)
#   --poll SECONDS           between checks (default 60; fractions allowed)
#   --hang-minutes M         no worker's log grew for M minutes: restart the run; no worker
#                            answered ssh for M minutes: recreate the slice (default 30;
#                            fractions allowed); longer than a compile and a checkpoint save
#   --stop-grace SECONDS     stopping a run: SIGTERM, then SIGKILL after this (default 120)
#   --max-restarts N         slice recreations plus run restarts before giving up (default 20)
#   --keep                   leave the slice up when the report is there (default: delete it)
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
HANG_MINUTES=30
STOP_GRACE=120
MAX_RESTARTS=20
KEEP=0
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
    --sync-only) SETUP+=("$1"); shift ;;
    --poll) need_arg "$@"; POLL=$2; shift 2 ;;
    --hang-minutes) need_arg "$@"; HANG_MINUTES=$2; shift 2 ;;
    --stop-grace) need_arg "$@"; STOP_GRACE=$2; shift 2 ;;
    --max-restarts) need_arg "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
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
NUMBER='^[0-9]+([.][0-9]+)?$'
[[ $POLL =~ $NUMBER ]] || die "--poll '$POLL': a number of seconds"
[[ $HANG_MINUTES =~ $NUMBER ]] || die "--hang-minutes '$HANG_MINUTES': a number of minutes"
[[ $STOP_GRACE =~ ^[0-9]+$ ]] || die "--stop-grace '$STOP_GRACE': a whole number of seconds"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts '$MAX_RESTARTS': a whole number"
HANG_S=$(awk -v m="$HANG_MINUTES" 'BEGIN { printf "%d", m * 60 }')
# How long asking the workers (or starting the run on them) may take: an ssh to a hung VM can
# hang too. setup.sh installs, so it gets longer.
ASK_S=$((HANG_S < 10 ? 10 : HANG_S > 300 ? 300 : HANG_S))
SETUP_S=$((HANG_S > 600 ? HANG_S : 600))

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

# ACTIVE / READY when up; PREEMPTED, SUSPENDED, FAILED, ... or NOT_FOUND when it must be remade;
# UNKNOWN when describe failed otherwise (quota, network, a 503): that says nothing of the slice.
slice_state() {
  local state err
  err=$(mktemp)
  if state=$("${DESCRIBE[@]}" 2>"$err"); then
    printf '%s\n' "${state:-UNKNOWN}"
  elif grep -q 'NOT_FOUND' "$err"; then
    echo NOT_FOUND
  else
    say "describe failed: $(tail -n 1 "$err")"
    echo UNKNOWN
  fi
  rm -f "$err"
}

on_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all \
    --command "$(remote bash "$REMOTE_DIR/launch/worker.sh" "$@")"
}

# running on every worker and some log grew within --hang-minutes: ok; else stopped or hung.
# unknown when ssh itself failed (then nothing is concluded this round).
run_health() {
  local status idle
  status=$(with_timeout "$ASK_S" on_workers status 2>/dev/null) || { echo unknown; return 0; }
  if [[ -z $status ]] || grep -qv 'running (pid' <<<"$status"; then
    echo stopped
    return 0
  fi
  idle=$(sed -n 's/.*running (pid [0-9]*) idle \([0-9]*\)s.*/\1/p' <<<"$status" |
    sort -n | head -n 1)
  if ((${idle:-0} > HANG_S)); then
    echo hung
  else
    echo ok
  fi
}

delete_slice() {
  local del=("${SCOPED[@]}" --yes)
  if ((QUEUED)); then
    del+=(--queued)
    [[ -z $QUEUED_ID ]] || del+=(--queued-id "$QUEUED_ID")
  fi
  bash "$HERE/delete.sh" ${DRY[@]+"${DRY[@]}"} "${del[@]}"
}

recreate() {
  delete_slice || true  # already gone is fine
  bash "$HERE/create.sh" ${DRY[@]+"${DRY[@]}"} "${SCOPED[@]}" "${CREATE[@]}"
}

start_run() {
  with_timeout "$ASK_S" bash "$HERE/run.sh" ${DRY[@]+"${DRY[@]}"} "${SCOPED[@]}" \
    --accelerator-type "$ACCEL" --workdir "$WORKDIR" --mode "$MODE" ${RUN[@]+"${RUN[@]}"}
}

report_exists() {
  "${LS[@]}" >/dev/null 2>&1
}

if ((DRY_RUN)); then
  quote "${LS[@]}"
  quote "${DESCRIBE[@]}"
  recreate
  bash "$HERE/setup.sh" --dry-run "${SCOPED[@]}" ${SETUP[@]+"${SETUP[@]}"}
  start_run
  exit 0
fi

# One supervisor per slice: two would delete and recreate it under each other.
LOCK=${XDG_STATE_HOME:-$HOME/.local/state}/idea-prune/supervise-${PROJECT:-default}-$ZONE-$NAME
mkdir -p "$(dirname "$LOCK")"
if ! mkdir "$LOCK" 2>/dev/null; then
  other=$(cat "$LOCK/pid" 2>/dev/null || true)
  if [[ $other =~ ^[0-9]+$ ]] && kill -0 "$other" 2>/dev/null; then
    die "another supervise.sh (pid $other) already watches $NAME; stop that one first"
  fi
  say "taking over the lock of a supervisor that is gone ($LOCK)"
fi
echo "$$" >"$LOCK/pid"
trap 'rm -rf "$LOCK"' EXIT

started=0
restarts=0
failed_describes=0
unreachable_since=''  # $SECONDS when the workers' status first could not be read, in a row
restart() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) || die "$1 again after $MAX_RESTARTS restarts; giving up"
  say "$1: $2 ($restarts)"
}
# A new slice; the next round that finds it ACTIVE sets it up and starts the run.
start_over() {
  restart "$1" 'recreating it'
  recreate || say 'create failed (no capacity?); trying again next round'
  started=0
}
while :; do
  wait_s=$POLL
  if report_exists; then
    say "done: ${WORKDIR%/}/$DONE_FILE exists"
    if ((!KEEP)); then
      delete_slice || say "could not delete $NAME; delete it by hand"
    fi
    exit 0
  fi
  state=$(slice_state)
  [[ $state == UNKNOWN ]] || failed_describes=0
  case $state in
    ACTIVE | READY)
      if ((!started)); then
        say "slice $state: setup, then the run"
        unreachable_since=''
        if with_timeout "$SETUP_S" bash "$HERE/setup.sh" "${SCOPED[@]}" ${SETUP[@]+"${SETUP[@]}"} &&
          start_run; then
          started=1
        else
          restart 'setup or start failed' 'trying again next round'
        fi
      else
        health=$(run_health)
        [[ $health == unknown ]] || unreachable_since=''
        case $health in
          stopped | hung)
            report_exists && continue  # it just finished
            restart "the run $health, no report (slice $state)" 'stopping it everywhere, restarting'
            with_timeout $((STOP_GRACE + ASK_S)) on_workers stop "$STOP_GRACE" >&2 || true
            start_run || say 'start failed; trying again next round'
            ;;
          unknown)
            unreachable_since=${unreachable_since:-$SECONDS}
            if ((SECONDS - unreachable_since >= HANG_S)); then
              start_over "no worker answered for $((SECONDS - unreachable_since))s (slice $state)"
            else
              say 'could not ask the workers (ssh failed); asking again next round'
            fi
            ;;
        esac
      fi
      ;;
    # Not SUSPENDING / STOPPING: that is the preemption notice, the run is saving a checkpoint.
    PREEMPTED | SUSPENDED | FAILED | TERMINATED | STOPPED | NOT_FOUND)
      start_over "slice $state"
      ;;
    UNKNOWN)
      # Backoff: the API is struggling; each failure in a row doubles the wait, up to 16 polls.
      failed_describes=$((failed_describes + 1))
      wait_s=$(awk -v p="$POLL" -v n="$failed_describes" 'BEGIN { print p * 2 ^ (n < 5 ? n : 4) }')
      say "slice state unknown ($failed_describes in a row): asking again in ${wait_s}s"
      ;;
    *) say "slice $state: waiting" ;;
  esac
  sleep "$wait_s"
done
