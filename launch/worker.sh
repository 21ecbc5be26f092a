#!/usr/bin/env bash
# Runs ON each TPU VM worker (setup.sh and run.sh call it over ssh); not for your workstation.
#
#   worker.sh setup [JAX_SPEC]        venv at REPO/.venv with Python >= 3.11, then
#                                     pip install -e 'REPO[data,gcs]' JAX_SPEC (default 'jax[tpu]');
#                                     gcs always: gs:// workdirs and data need gcsfs
#   worker.sh start [VAR=VALUE ...] ARGS...
#                                     idea-prune ARGS in the background, detached from ssh
#                                     (setsid + nohup), appending to REPO/logs/run.log
#   worker.sh stop [GRACE_S]          SIGTERM to that run: it checkpoints and exits; with GRACE_S,
#                                     SIGKILL if it is still there GRACE_S seconds later (hung)
#   worker.sh status                  running or not, seconds since the log last grew, its last line
#   worker.sh mount-data BUCKET       gcsfuse-mounts BUCKET read-only at /mnt/BUCKET (installs
#                                     gcsfuse from Google's apt repository if missing)
#
# REPO is the directory above this script.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
LOG=$REPO/logs/run.log
PIDFILE=$REPO/logs/run.pid
HOST=${HOSTNAME:-$(uname -n)}

die() {
  printf 'worker.sh on %s: error: %s\n' "$HOST" "$*" >&2
  exit 2
}

find_python() {
  local py
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

apt_install() {
  # Lock timeout: right after boot, unattended-upgrades often holds the dpkg lock.
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq update
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "$@"
}

setup() {
  local jax_spec=${1:-jax[tpu]} py
  # TPU VM images (Ubuntu 22.04) ship Python 3.10; the package needs 3.11.
  if ! py=$(find_python); then
    apt_install python3.11 python3.11-venv
    py=python3.11
  fi
  if [[ ! -x $VENV/bin/python ]] && ! "$py" -m venv "$VENV"; then
    apt_install "$py-venv"  # Ubuntu ships ensurepip separately
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "${REPO}[data,gcs]" "$jax_spec"
  # No backend init here: on a multi-host slice that would wait for the other workers.
  "$VENV/bin/python" -c 'import jax, idea_prune_jax; print("jax", jax.__version__)' |
    sed "s/^/$HOST: /"
}

running_pid() {
  local pid cmdline
  [[ -f $PIDFILE ]] || return 1
  pid=$(cat "$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # Alive and still idea-prune: a zombie's cmdline is empty, a reused pid's names another program.
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $cmdline == *idea-prune* ]] || return 1
  echo "$pid"
}

start() {
  local env=() pid
  while (($#)) && [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
    env+=("$1")
    shift
  done
  (($#)) || die 'start needs the idea-prune arguments, e.g. run --config C --workdir W'
  [[ -x $VENV/bin/idea-prune ]] || die "no $VENV/bin/idea-prune; run launch/setup.sh first"
  if pid=$(running_pid); then
    die "a run is already going here (pid $pid); stop it first: launch/run.sh --stop"
  fi
  mkdir -p "$(dirname "$LOG")"
  printf '\n=== %s %s: %s idea-prune %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$HOST" \
    "${env[*]-}" "$*" >>"$LOG"
  cd "$REPO"
  # setsid: a new session, so the ssh session's hangup never reaches the run; nohup for the
  # rest. Each execs the next, so $! is idea-prune's own pid and SIGTERM reaches its handler.
  setsid nohup env ${env[@]+"${env[@]}"} "$VENV/bin/idea-prune" "$@" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PIDFILE"
  echo "$HOST: started pid $!, log $LOG"
}

stop() {
  local grace=${1:-} pid waited=0
  if ! pid=$(running_pid); then
    echo "$HOST: no run going"
    return 0
  fi
  kill -TERM "$pid"
  echo "$HOST: sent SIGTERM to pid $pid; it saves a checkpoint and exits (see $LOG)"
  [[ -n $grace ]] || return 0
  [[ $grace =~ ^[0-9]+$ ]] || die "stop: GRACE_S '$grace' is not a whole number of seconds"
  while running_pid >/dev/null && ((waited < grace * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if running_pid >/dev/null; then
    kill -KILL "$pid"
    echo "$HOST: pid $pid still there after ${grace}s: sent SIGKILL"
  fi
}

status() {
  local pid last='' idle=0
  if [[ -f $LOG ]]; then
    last=$(tail -n 1 "$LOG")
    idle=$(($(date +%s) - $(stat -c %Y "$LOG")))
  fi
  if pid=$(running_pid); then
    # supervise.sh's hang watchdog reads "idle Ns": a hung step stops the log on every worker.
    echo "$HOST: running (pid $pid) idle ${idle}s: $last"
  else
    echo "$HOST: not running: $last"
  fi
}

install_gcsfuse() {
  local repo keyring=/usr/share/keyrings/cloud.google.asc
  repo=gcsfuse-$(lsb_release -c -s)
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  apt_install gcsfuse
}

# Prepared data never changes once its manifest.json exists, so metadata is cached for the life
# of the mount (-1): ArrayRecord's random reads then cost one GCS range read each, no stat calls.
# Mount after prepare-data has finished: files written later stay invisible to this mount.
mount_data() {
  local bucket=${1:-} mnt
  [[ $bucket =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "mount-data needs a bucket name, got '$bucket'"
  mnt=/mnt/$bucket
  command -v gcsfuse >/dev/null || install_gcsfuse
  if mountpoint -q "$mnt"; then
    echo "$HOST: $mnt is already mounted"
    return 0
  fi
  sudo mkdir -p "$mnt"
  sudo chown "$(id -u):$(id -g)" "$mnt"
  gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1 \
    --type-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 "$bucket" "$mnt"
  echo "$HOST: gs://$bucket mounted read-only at $mnt"
}

case ${1:-} in
  setup | start | stop | status)
    cmd=$1
    shift
    "$cmd" "$@"
    ;;
  mount-data)
    shift
    mount_data "$@"
    ;;
  -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ;;
  *) die "unknown command ${1:-(none)}; use setup, start, stop, status or mount-data" ;;
esac
