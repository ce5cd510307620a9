# shellcheck shell=bash
# Shared by the tpu_setup scripts (sourced, never run): options, the env file, one-line errors, dry-run
# printing, and the gcloud commands that differ between a TPU VM and a queued resource.

TPU_SETUP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$TPU_SETUP_DIR")
SCRIPT_NAME="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
SCRIPT_NAME=${SCRIPT_NAME#"$REPO"/}
DRY_RUN=false
ARGS=()
exec 3>&1 # dry-run output goes here, so commands printed from inside $(...) still reach the terminal

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

note() { echo "$SCRIPT_NAME: $*" >&2; }

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || die "needs bash >= 4.4 (this is $BASH_VERSION)"

# The words as one shell command line; plain words (and the --flag= of --flag=value) stay bare, so
# printed commands read naturally.
quote() {
  local words=() word flag
  for word in "$@"; do
    flag=""
    if [[ $word =~ ^--[A-Za-z0-9_.-]+= ]]; then
      flag=${BASH_REMATCH[0]}
      word=${word#"$flag"}
    fi
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$flag$word")
    else
      words+=("$flag'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Run a command, or under --dry-run print it (quoted, ready to paste) instead.
run() {
  if $DRY_RUN; then
    quote "$@" >&3
  else
    "$@"
  fi
}

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; } # the comment at the top of the script

# --env FILE, --dry-run and --help; everything else is left in ARGS for the script.
parse_args() {
  ENV_FILE=${TPU_SETUP_ENV:-$TPU_SETUP_DIR/env.sh}
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=true ;;
      --env)
        (($# > 1)) || die "--env needs a file"
        ENV_FILE=$2
        shift
        ;;
      --env=*) ENV_FILE=${1#--env=} ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# The start of a script that takes no arguments of its own: the options, then the env file.
parse_options_and_env() {
  parse_args "$@"
  ((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
  load_env
}

# Options to hand on to another tpu_setup script.
child_options() {
  CHILD=(--env "$ENV_FILE")
  if $DRY_RUN; then CHILD+=(--dry-run); fi
}

REQUIRED=(PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME BUCKET RUN_ID CONFIG)
OPTIONAL=(CAPACITY NUM_SLICES QUEUED SERVICE_ACCOUNT CREATE_FLAGS TRAIN_ARGS PYTHON REMOTE_DIR USE_GCSFUSE
  MOUNT_DIR GCSFUSE_FLAGS WORKDIR DATA_DIR CREATE_RETRIES RETRY_DELAY_S POLL_S BABYSIT_INTERVAL_S STOP_TIMEOUT_S)

is_array() { [[ $(declare -p "$1" 2>/dev/null) == "declare -a"* ]]; }

positive() { [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "$1=${!1} in $ENV_NAME must be a positive integer"; }

# Read the env file (only it: variables from the calling shell are dropped), check it, fill in defaults.
load_env() {
  ENV_NAME=${ENV_FILE#"$REPO"/}
  [[ -f $ENV_FILE ]] || die "no env file $ENV_NAME; copy tpu_setup/env.example.sh to tpu_setup/env.sh and edit it"
  unset "${REQUIRED[@]}" "${OPTIONAL[@]}"
  # shellcheck source=env.example.sh
  source "$ENV_FILE"
  local var
  for var in "${REQUIRED[@]}"; do
    [[ -n ${!var:-} ]] || die "$var is not set in $ENV_NAME"
  done
  [[ $RUN_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_ID=$RUN_ID in $ENV_NAME may hold only letters, digits, '.', '_' and '-'"
  CAPACITY=${CAPACITY:-on-demand}
  NUM_SLICES=${NUM_SLICES:-1}
  QUEUED=${QUEUED:-false}
  SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
  PYTHON=${PYTHON:-python3.11}
  REMOTE_DIR=${REMOTE_DIR:-diffjax}
  USE_GCSFUSE=${USE_GCSFUSE:-false}
  MOUNT_DIR=${MOUNT_DIR:-/mnt/gcs}
  MOUNT_DIR=${MOUNT_DIR%/}
  CREATE_RETRIES=${CREATE_RETRIES:-10}
  RETRY_DELAY_S=${RETRY_DELAY_S:-120}
  POLL_S=${POLL_S:-30}
  BABYSIT_INTERVAL_S=${BABYSIT_INTERVAL_S:-300}
  STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-600}
  for var in CREATE_FLAGS TRAIN_ARGS GCSFUSE_FLAGS; do
    if [[ -z ${!var+set} ]]; then
      declare -ga "$var=()"
    elif ! is_array "$var"; then
      die "$var in $ENV_NAME must be a bash array, e.g. $var=(--flag=value --other)"
    fi
  done
  ((${#GCSFUSE_FLAGS[@]})) || GCSFUSE_FLAGS=(--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0)
  case $CAPACITY in on-demand | spot | reserved) ;; *)
    die "CAPACITY=$CAPACITY in $ENV_NAME must be on-demand, spot or reserved"
    ;;
  esac
  for var in QUEUED USE_GCSFUSE; do
    [[ ${!var} == true || ${!var} == false ]] || die "$var=${!var} in $ENV_NAME must be true or false"
  done
  for var in NUM_SLICES CREATE_RETRIES RETRY_DELAY_S POLL_S BABYSIT_INTERVAL_S STOP_TIMEOUT_S; do
    positive "$var"
  done
  if $USE_GCSFUSE; then # the bucket mounted on every worker (setup.sh), paths through the mount
    WORKDIR=${WORKDIR:-$MOUNT_DIR/runs/$RUN_ID}
    DATA_DIR=${DATA_DIR:-$MOUNT_DIR/tensorflow_datasets}
  else # train.py reads and writes gs:// itself
    WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$RUN_ID}
    DATA_DIR=${DATA_DIR:-gs://$BUCKET/tensorflow_datasets}
  fi
  LOCATION=(--project="$PROJECT" --zone="$ZONE")
}

# The gs:// URL of a path as the workers see it: the path itself when it is a gs:// URL, its place in the
# bucket when it is under the gcsfuse mount (USE_GCSFUSE=true); nothing for a path on a worker's own disk.
bucket_url() {
  local path=${1%/}
  if [[ $path == gs://* ]]; then
    echo "$path"
  elif $USE_GCSFUSE && [[ $path == "$MOUNT_DIR"/* ]]; then
    echo "gs://$BUCKET/${path#"$MOUNT_DIR"/}"
  fi
}

# Multislice exists only as a queued resource.
queued() { [[ $QUEUED == true ]] || ((NUM_SLICES > 1)); }

group() { if queued; then echo queued-resources; else echo tpu-vm; fi; }

# A command on the workers: WORKERS is "all" (every worker of every slice) or "0" (the first one).
ssh_workers() {
  local workers=$1 command=$2
  if queued; then
    local nodes=all
    [[ $workers == all ]] || nodes=0
    run gcloud compute tpus queued-resources ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$workers" --node="$nodes" \
      --command="$command"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$workers" --command="$command"
  fi
}

# A shell command line that runs the words in the code directory on a worker.
remote() { echo "cd $(quote "$REMOTE_DIR") && $(quote "$@")"; }

# What gcloud reports as the slice's state (READY, PREEMPTED, ACTIVE, SUSPENDED, ...), MISSING when the zone
# holds no such resource, UNKNOWN when gcloud itself fails (never a reason to delete anything).
# Under --dry-run: the commands, and DRY_RUN_STATE (MISSING unless a script sets another).
slice_state() {
  local field=state names state
  if queued; then field=state.state; fi
  local describe=(gcloud compute tpus "$(group)" describe "$TPU_NAME" "${LOCATION[@]}" --format="value($field)")
  local list=(gcloud compute tpus "$(group)" list "${LOCATION[@]}" --format="value(name.basename())")
  if $DRY_RUN; then
    quote "${describe[@]}" >&3
    echo "${DRY_RUN_STATE:-MISSING}"
  elif state=$("${describe[@]}" 2>/dev/null); then
    echo "${state:-UNKNOWN}"
  elif names=$("${list[@]}" 2>/dev/null); then
    if grep -qx "$TPU_NAME" <<<"$names"; then echo UNKNOWN; else echo MISSING; fi
  else
    echo UNKNOWN
  fi
}

# States after which the slice never runs again: it has to be deleted and created anew.
dead() { [[ $1 =~ ^(PREEMPTED|TERMINATED|FAILED|SUSPENDING|SUSPENDED)$ ]]; }

# The training command every worker runs: the same run id and workdir each time, so a relaunch resumes.
train_command() {
  TRAIN=(env DIFFJAX_MULTIHOST=1 .venv/bin/python train.py --config="$CONFIG" --config.workdir="$WORKDIR")
  if [[ -n $DATA_DIR ]]; then TRAIN+=(--config.data.data_dir="$DATA_DIR"); fi
  if ((NUM_SLICES > 1)) && [[ " ${TRAIN_ARGS[*]} " != *" --config.mesh.dcn_shape="* ]]; then
    TRAIN+=("--config.mesh.dcn_shape=($NUM_SLICES,1,1)") # data parallelism across slices
  fi
  TRAIN+=("${TRAIN_ARGS[@]}")
}
