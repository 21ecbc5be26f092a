#!/usr/bin/env bash
# Start idea-prune on every worker of a TPU VM slice at once, multi-host (IDEA_PRUNE_DISTRIBUTED=1),
# in the background: each worker appends to its own ~/REMOTE_DIR/logs/run.log and the run lives
# on when ssh drops. Rerunning the same command after a preemption resumes from the workdir's
# latest checkpoint.
#
#   launch/run.sh --name NAME --zone ZONE --workdir gs://BUCKET/DIR [options] \
#       [--config.a.b=v ...] [-- MORE_IDEA_PRUNE_ARGS]
#   launch/run.sh --name NAME --zone ZONE --stop      SIGTERM: checkpoint and exit, all workers
#   launch/run.sh --name NAME --zone ZONE --status    running or not, and each log's last line
#
#   --name NAME          TPU VM (node) name
#   --zone ZONE          its zone
#   --project PROJECT    default: gcloud's configured project
#   --workdir DIR        gs://BUCKET/DIR (or an absolute path every worker shares)
#   --config FILE[:VAR]  a config in this checkout (default configs/paper_2p8b_to_1p3b.py); without
#                        :VARIANT, the one compile-checked for the slice's type (v5p-64 -> :v5p64,
#                        v6e-64 -> :v6e64, v5litepod-64 -> :v5e64), or an error if it has none
#   --accelerator-type T the slice's type, to pick that variant (default: asks tpu-vm describe)
#   --mode MODE          the idea-prune command: run (default), compare or train
#   --env VAR=VALUE      an environment variable for the run (repeatable; e.g. LIBTPU_INIT_ARGS=...)
#   --config.a.b=v       config overrides, passed through as single words (spaces, commas kept)
#   --remote-dir DIR     on each worker, relative to the home directory (default idea_prune_jax)
#   --dry-run            print the gcloud command instead of running it
#   -h, --help           this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACTION=start
WORKDIR=''
ACCEL=''
CONFIG=configs/paper_2p8b_to_1p3b.py
MODE=run
ENVS=(IDEA_PRUNE_DISTRIBUTED=1)
PASS=()

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --workdir) need_arg "$@"; WORKDIR=$2; shift 2 ;;
    --config) need_arg "$@"; CONFIG=$2; shift 2 ;;
    --accelerator-type) need_arg "$@"; ACCEL=$2; shift 2 ;;
    --mode) need_arg "$@"; MODE=$2; shift 2 ;;
    --env) need_arg "$@"; ENVS+=("$2"); shift 2 ;;
    --config.*=*) PASS+=("$1"); shift ;;
    --config.*) die "write config overrides as one word, $1=VALUE" ;;
    --stop) ACTION=stop; shift ;;
    --status) ACTION=status; shift ;;
    --remote-dir) need_arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    --) shift; PASS+=("$@"); break ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done
require_name_zone

worker_sh=$REMOTE_DIR/launch/worker.sh
if [[ $ACTION != start ]]; then
  ssh_workers all "$(remote bash "$worker_sh" "$ACTION")"
  exit 0
fi

[[ -n $WORKDIR ]] || die 'missing --workdir (gs://BUCKET/DIR, shared by all workers); see --help'
# Each worker writes its shards of every checkpoint there, so it must be one shared place.
[[ $WORKDIR == /* || $WORKDIR == gs://?* ]] ||
  die "--workdir '$WORKDIR' must be gs://BUCKET/DIR or an absolute path all workers share"
case $MODE in
  run | compare | train) ;;
  *) die "--mode '$MODE': use run, compare or train" ;;
esac
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] ||
  die "--config '$CONFIG': no such file in this checkout (setup.sh copies the checkout)"
for e in "${ENVS[@]}"; do
  [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$e': write it as VAR=VALUE"
done
if [[ $CONFIG != *:* && -z $ACCEL ]]; then
  ((!DRY_RUN)) || die "--config '$CONFIG' without :VARIANT: pass --accelerator-type to pick one"
  gcloud_scope
  ACCEL=$(gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" \
    --format='value(acceleratorType)') || die "cannot ask $NAME its type; pass --accelerator-type"
fi
CONFIG=$(config_for_accel "$CONFIG" "$ACCEL")

ssh_workers all "$(remote bash "$worker_sh" start "${ENVS[@]}" "$MODE" --config "$CONFIG" \
  --workdir "$WORKDIR" ${PASS[@]+"${PASS[@]}"})"
if ((!DRY_RUN)); then
  echo "$PROG: started; follow worker 0 with: $(quote "$(dirname "$0")/logs.sh" --name "$NAME" \
    --zone "$ZONE")" >&2
fi
