#!/usr/bin/env bash
# Delete the slice of env.sh (the TPU VM, or the queued resource with its nodes). The bucket, and with it
# the run's checkpoints and logs, stays.
#
#   tpu_setup/delete.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"

if ! $DRY_RUN && [[ $(slice_state) == MISSING ]]; then
  note "$TPU_NAME does not exist in $ZONE; nothing to delete"
  exit 0
fi
if queued; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
