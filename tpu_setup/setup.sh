#!/usr/bin/env bash
# Make every worker ready to train: sync the code (sync.sh), then on all workers at once install the venv
# with the pinned diffjax[tpu,gcs] and, with USE_GCSFUSE=true, mount the bucket with gcsfuse
# (tpu_setup/worker/setup.sh). Idempotent.
#
#   tpu_setup/setup.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"
child_options

"$TPU_SETUP_DIR/sync.sh" "${CHILD[@]}"
worker=(bash tpu_setup/worker/setup.sh --python "$PYTHON")
if $USE_GCSFUSE; then worker+=(--bucket "$BUCKET" --mount-dir "$MOUNT_DIR" -- "${GCSFUSE_FLAGS[@]}"); fi
ssh_workers all "$(remote "${worker[@]}")"
