#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM slice and install it there.
#
#   launch/setup.sh --name NAME --zone ZONE [options]
#
# Packs the working tree (uncommitted edits included; .git, .venv, runs and caches left out),
# copies it to ~/REMOTE_DIR on all workers, and runs launch/worker.sh setup there: a venv with
# Python >= 3.11 (installed from apt when the image lacks it) and
# pip install -e '.[data,gcs]' JAX_SPEC: the gcs extra always, for gs:// workdirs and data.
# Rerun it after editing code or configs.
#
#   --name NAME          TPU VM (node) name
#   --zone ZONE          its zone
#   --project PROJECT    default: gcloud's configured project
#   --jax SPEC           the JAX requirement to install (default: the pin of pyproject.toml's
#                        tpu extra, below)
#   --sync-only          copy the code, skip the install (code/config edits after a full setup)
#   --data-bucket B      also mount bucket B read-only at /mnt/B on every worker (gcsfuse,
#                        installed if missing), for --config.data.prepared_dir=/mnt/B/...
#   --remote-dir DIR     on each worker, relative to the home directory (default idea_prune_jax)
#   --dry-run            print the tar and gcloud commands instead of running them
#   -h, --help           this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The one place that names the jax[tpu] version: pyproject.toml's `tpu = ["jax[tpu]==X"]`.
JAX_SPEC=$(sed -n 's/^tpu = \["\([^"]*\)"\].*/\1/p' "$REPO_ROOT/pyproject.toml")

help_footer() {
  echo "--jax default here: '${JAX_SPEC:-none: pyproject.toml has no tpu extra}'"
}
SYNC_ONLY=0
DATA_BUCKET=''

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --jax) need_arg "$@"; JAX_SPEC=$2; shift 2 ;;
    --sync-only) SYNC_ONLY=1; shift ;;
    --remote-dir) need_arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    --data-bucket) need_arg "$@"; DATA_BUCKET=$2; shift 2 ;;
    *) common_opt "$@" || die "unknown argument '$1'; see --help"; shift "$SHIFT" ;;
  esac
done
require_name_zone
[[ -n $JAX_SPEC ]] || die 'no tpu extra in pyproject.toml to take the jax[tpu] pin from; pass --jax'
if [[ -n $DATA_BUCKET ]]; then
  DATA_BUCKET=${DATA_BUCKET#gs://}
  DATA_BUCKET=${DATA_BUCKET%/}
  [[ $DATA_BUCKET =~ ^[a-z0-9][a-z0-9._-]*$ ]] ||
    die "--data-bucket '$DATA_BUCKET': pass a bucket name; the whole bucket is mounted at /mnt/NAME"
fi

TARBALL=${TMPDIR:-/tmp}/idea_prune_jax-$NAME.tgz
REMOTE_TARBALL=$REMOTE_DIR.tgz
# COPYFILE_DISABLE: macOS tar would otherwise add ._* resource-fork files.
run_or_print env COPYFILE_DISABLE=1 tar -czf "$TARBALL" -C "$REPO_ROOT" \
  --exclude=.git --exclude=.venv --exclude=runs --exclude='workdir*' --exclude=__pycache__ \
  --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis --exclude=.whl \
  --exclude=build .

gcloud_scope
run_or_print gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" "${SCOPE[@]}" \
  --worker=all

line="mkdir -p $(remote "$REMOTE_DIR") && tar -xzf $(remote "$REMOTE_TARBALL") \
-C $(remote "$REMOTE_DIR") && rm $(remote "$REMOTE_TARBALL")"
if ((!SYNC_ONLY)); then
  line+=" && $(remote bash "$REMOTE_DIR/launch/worker.sh" setup "$JAX_SPEC")"
fi
if [[ -n $DATA_BUCKET ]]; then
  line+=" && $(remote bash "$REMOTE_DIR/launch/worker.sh" mount-data "$DATA_BUCKET")"
fi
ssh_workers all "$line"
