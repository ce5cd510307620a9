#!/usr/bin/env bash
# Create the slice of env.sh and wait until it is usable: a TPU VM, or a queued resource (QUEUED=true, or
# NUM_SLICES > 1 for multislice), on-demand, spot or reserved (CAPACITY). Retries when there is no capacity
# or the request fails; a slice that is already READY/ACTIVE is left alone.
#
#   tpu_setup/create.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"
child_options

create() {
  local common=("$TPU_NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE")
  common+=(--scopes=https://www.googleapis.com/auth/cloud-platform) # the bucket is written; IAM decides the rest
  case $CAPACITY in
    spot) common+=(--spot) ;;
    reserved) common+=(--reserved) ;;
  esac
  if [[ -n $SERVICE_ACCOUNT ]]; then common+=(--service-account="$SERVICE_ACCOUNT"); fi
  if ! queued; then
    run gcloud compute tpus tpu-vm create "${common[@]}" --version="$RUNTIME_VERSION" "${CREATE_FLAGS[@]}"
  elif ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources create "${common[@]}" --runtime-version="$RUNTIME_VERSION" \
      --node-count="$NUM_SLICES" --node-prefix="$TPU_NAME" "${CREATE_FLAGS[@]}"
  else
    run gcloud compute tpus queued-resources create "${common[@]}" --runtime-version="$RUNTIME_VERSION" \
      --node-id="$TPU_NAME" "${CREATE_FLAGS[@]}"
  fi
}

# Poll until READY/ACTIVE (0) or a state it never leaves (1). A queued resource waits here for capacity.
wait_usable() {
  local state
  while :; do
    state=$(slice_state)
    $DRY_RUN && return 0
    case $state in
      READY | ACTIVE) return 0 ;;
      STOPPED) die "$TPU_NAME is STOPPED: start it (gcloud compute tpus tpu-vm start) or delete it" ;;
    esac
    if dead "$state" || [[ $state == MISSING ]]; then
      note "$TPU_NAME is $state"
      return 1
    fi
    note "$TPU_NAME is $state; waiting"
    sleep "$POLL_S"
  done
}

for ((attempt = 1; attempt <= CREATE_RETRIES; attempt++)); do
  state=$(slice_state)
  if [[ $state == READY || $state == ACTIVE ]]; then
    note "$TPU_NAME is already $state"
    exit 0
  fi
  if dead "$state"; then "$TPU_SETUP_DIR/delete.sh" "${CHILD[@]}"; fi
  if dead "$state" || [[ $state == MISSING ]]; then
    note "creating $TPU_NAME ($ACCELERATOR_TYPE x $NUM_SLICES, $CAPACITY), attempt $attempt of $CREATE_RETRIES"
    create || note "create failed"
  fi
  if wait_usable; then
    $DRY_RUN || note "$TPU_NAME is ready"
    exit 0
  fi
  ((attempt == CREATE_RETRIES)) || sleep "$RETRY_DELAY_S"
done
die "no usable $TPU_NAME after $CREATE_RETRIES attempts; try another zone, CAPACITY or QUEUED=true"
