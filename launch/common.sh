# Shared by the launch/*.sh scripts (sourced, never run): argument helpers, the --name/--zone/
# --project/--dry-run/--help options, and run_or_print.
# Written for bash 3.2 too (macOS), hence no mapfile, namerefs or associative arrays.
# shellcheck shell=bash disable=SC2034  # the globals here are read by the scripts sourcing it

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
NAME=''
ZONE=''
PROJECT=''
REMOTE_DIR='idea_prune_jax'  # on each worker, relative to the ssh user's home

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# The help text is the script's own header comment, so it cannot drift from the script; then
# help_footer's lines, where a script has facts to add that live elsewhere (pyproject.toml).
usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  if declare -F help_footer >/dev/null; then
    help_footer
  fi
  exit 0
}

# --opt=value -> --opt value for every argument before `--`; --config.x=y and the rest pass as is.
# The result is in ARGS; callers do: split_equals "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
split_equals() {
  ARGS=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      ARGS+=("$@")
      return
    elif [[ $1 =~ ^(--[a-z][a-z-]*)=(.*)$ ]]; then
      ARGS+=("${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}")
    else
      ARGS+=("$1")
    fi
    shift
  done
}

need_arg() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    die "$1 needs a value; see --help"
  fi
}

# The options every script takes. Sets SHIFT to how many arguments it used; returns 1 if $1 is
# not one of them.
common_opt() {
  SHIFT=2
  case $1 in
    --name) need_arg "$@"; NAME=$2 ;;
    --zone) need_arg "$@"; ZONE=$2 ;;
    --project) need_arg "$@"; PROJECT=$2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage ;;
    *) return 1 ;;
  esac
}

require_name_zone() {
  [[ -n $NAME ]] || die 'missing --name (the TPU VM / node name); see --help'
  [[ -n $ZONE ]] || die 'missing --zone (e.g. us-east5-a); see --help'
}

# --zone and, when given, --project: appended to every gcloud command.
gcloud_scope() {
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE+=(--project="$PROJECT")
  fi
}

# One argument vector -> one line any POSIX shell reads back as the same vector: plain words as
# they are, the rest in single quotes (printf %q's backslashes and $'..' are bash-only and
# unreadable once nested in an ssh --command).
quote() {
  local line='' word q sq="'"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ && $word != =* ]]; then
      line+=" $word"
    else
      q=''
      while [[ $word == *"$sq"* ]]; do
        q+="${word%%"$sq"*}$sq\\$sq$sq"
        word=${word#*"$sq"}
      done
      line+=" $sq$q$word$sq"
    fi
  done
  printf '%s\n' "${line# }"
}

# Under --dry-run prints the command, quoted to be pasted into a shell; otherwise runs it.
run_or_print() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}

# A command line for the workers' shell: each word quoted, so spaces, commas and quotes in
# overrides arrive as the same words on every worker.
remote() {
  quote "$@"
}

# gcloud compute tpus tpu-vm ssh on --worker=$1 (all, 0, 1, ...) running the shell line $2.
ssh_workers() {
  gcloud_scope
  run_or_print gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker="$1" --command "$2"
}

# configs/X.py -> configs/X.py:VARIANT, the variant compile-checked for accelerator type $2
# (v5p-64 -> :v5p64, v5litepod-64 -> :v5e64, v6e-64 -> :v6e64); a config naming its variant is
# kept as given. The config file names its checked variants as quoted keys ('v5p64': ...).
config_for_accel() {
  local config=$1 accel=$2 variant
  if [[ $config == *:* ]]; then
    printf '%s\n' "$config"
    return 0
  fi
  variant=${accel/litepod/e}
  variant=${variant//-/}
  if [[ -z $accel ]] || ! grep -q "[\"']${variant}[\"']" "$REPO_ROOT/$config"; then
    die "--config '$config' has no variant for ${accel:-this slice}; pass \
--config $config:VARIANT, one checked with: idea-prune compile-check --config $config:VARIANT \
--topology ${accel:-TYPE}"
  fi
  printf '%s\n' "$config:$variant"
}

# SIGTERM to pid $1 and everything under it, children first (so none is re-parented and kept).
kill_tree() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    kill_tree "$child"
  done
  kill -TERM "$1" 2>/dev/null || true
}

# Runs "$@" for at most $1 seconds (then SIGTERM to it and its children: an ssh to a hung VM never
# returns); its stdout comes out once it ended, through a file, not a pipe, so nothing it leaves
# behind can hold the caller's $(...).
with_timeout() {
  local secs=$1 out pid watcher rc=0
  shift
  out=$(mktemp)
  "$@" >"$out" &
  pid=$!
  (sleep "$secs" && kill_tree "$pid") >/dev/null 2>&1 &
  watcher=$!
  wait "$pid" || rc=$?
  kill_tree "$watcher"  # and its sleep, which would outlive it
  cat "$out"
  rm -f "$out"
  return "$rc"
}
