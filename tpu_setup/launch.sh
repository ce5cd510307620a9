#!/usr/bin/env bash
# Start train.py on ALL workers at once (every host of every slice must run it, or the others wait for it),
# detached and logging per worker, with the run id and workdir of env.sh (gs://BUCKET/runs/RUN_ID unless
# set otherwise): the same command after a preemption resumes from the workdir's latest checkpoint. Workers
# where the run is already going are left alone. Assumes setup.sh has run.
#
#   tpu_setup/launch.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"

train_command
start=(bash tpu_setup/worker/run.sh start "$RUN_ID")
if $USE_GCSFUSE; then start+=(--mount "$MOUNT_DIR"); fi
ssh_workers all "$(remote "${start[@]}" -- "${TRAIN[@]}")"
logdir=$(bucket_url "$WORKDIR/tensorboard")
logdir=${logdir:-$WORKDIR/tensorboard}
$DRY_RUN || note "follow it with tpu_setup/logs.sh --follow; TensorBoard: tensorboard --logdir $logdir"
