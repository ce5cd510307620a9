#!/usr/bin/env bash
# Keep the run of env.sh going until it finishes: every BABYSIT_INTERVAL_S, look at the slice and the run.
#   - slice preempted, failed or gone: delete it, create it again, setup.sh, launch.sh;
#   - slice up but train.py not running on worker 0 (crashed, VM restarted): stop it on the others (a host
#     left alone waits forever for the dead one), setup.sh (remounts a gcsfuse bucket), launch.sh; after three
#     such restarts fail in a row (a worker that no longer answers), re-create the slice;
#   - the run's final checkpoint is in the bucket, or stop.sh stopped it: exit;
#   - train.py exited with code 2 on worker 0 (bad input: a flag, no bucket, no permission), which a
#     relaunch would only repeat: exit 2, the run's log has the reason.
# The relaunched command is the same, so train.py resumes from the workdir's latest checkpoint. Needs the
# workdir on the bucket (gs://BUCKET/..., the default, or under the gcsfuse mount with USE_GCSFUSE=true) and
# an ssh-agent holding your gcloud key (ssh to all workers).
# --dry-run prints the commands of one pass that finds the slice preempted, then exits.
#
#   tpu_setup/babysit.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"
child_options
gs_workdir=$(bucket_url "$WORKDIR")
[[ -n $gs_workdir ]] || die "babysit.sh resumes from the bucket: WORKDIR=$WORKDIR in $ENV_NAME is on the workers'" \
  "disks, lost with the slice; leave WORKDIR unset (gs://$BUCKET/runs/$RUN_ID), or keep it under MOUNT_DIR with" \
  "USE_GCSFUSE=true"

# Output of a read-only command; under --dry-run the command is printed and the output is empty.
query() {
  if $DRY_RUN; then
    quote "$@" >&3
  else
    "$@" 2>/dev/null
  fi
}

# The run is over when the checkpoint of its last step (config.json's total_steps) is complete: written
# straight to gs://, a step is complete once Orbax has put commit_success.txt into it (an object store
# cannot rename); through the mount, the step appears under its name only when renamed, complete.
finished() {
  local total step
  total=$(query gcloud storage cat "$gs_workdir/config.json" | sed -n 's/^  "total_steps": \([0-9]*\),*$/\1/p') || true
  [[ -n $total ]] || return 1
  step=$(query gcloud storage ls "$gs_workdir/checkpoints/$total/") || return 1
  if [[ $WORKDIR == gs://* ]]; then
    grep -q "/checkpoints/$total/commit_success.txt$" <<<"$step"
  else
    [[ -n $step ]]
  fi
}

worker0_status() {
  if $DRY_RUN; then return; fi
  ssh_workers 0 "$(remote bash tpu_setup/worker/run.sh status "$RUN_ID")" 2>/dev/null | tail -n 1 || true
}

# Each step only after the previous one worked; a failure is reported and the next pass tries again.
relaunch() {
  "$TPU_SETUP_DIR/setup.sh" "${CHILD[@]}" && "$TPU_SETUP_DIR/launch.sh" "${CHILD[@]}"
}

recreate() {
  "$TPU_SETUP_DIR/delete.sh" "${CHILD[@]}" && "$TPU_SETUP_DIR/create.sh" "${CHILD[@]}" && relaunch
}

restart() {
  ssh_workers all "$(remote bash tpu_setup/worker/run.sh stop "$RUN_ID" "$STOP_TIMEOUT_S" --restart)" && relaunch
}

trap 'note "babysit ends; the run itself goes on"; exit 130' INT
DRY_RUN_STATE=PREEMPTED
failed_restarts=0
note "watching $TPU_NAME and run $RUN_ID (workdir $gs_workdir) every ${BABYSIT_INTERVAL_S}s"
while :; do
  if finished; then
    note "run $RUN_ID has its final checkpoint in $gs_workdir: done (delete the slice with tpu_setup/delete.sh)"
    exit 0
  fi
  state=$(slice_state)
  if dead "$state" || [[ $state == MISSING ]] || ((failed_restarts >= 3)); then
    note "$(date -u +%FT%TZ) $TPU_NAME is $state (restarts failed: $failed_restarts): re-creating it, relaunching $RUN_ID"
    if recreate; then failed_restarts=0; else note "re-creating failed; trying again"; fi
  elif [[ $state == READY || $state == ACTIVE ]]; then
    status=$(worker0_status)
    case $status in
      running) failed_restarts=0 ;;
      stopped)
        note "$RUN_ID was stopped with stop.sh; babysit ends"
        exit 0
        ;;
      "exited 2") # bad input (a flag, no bucket, no permission): a relaunch would fail the same way
        die "train.py on worker 0 refused its input (exit code 2; tpu_setup/logs.sh shows why): fix it, then" \
          "launch.sh and babysit.sh again"
        ;;
      *)
        note "$(date -u +%FT%TZ) $RUN_ID is not running on worker 0 (${status:-no answer}): relaunching"
        if restart; then failed_restarts=0; else failed_restarts=$((failed_restarts + 1)); fi
        ;;
    esac
  else
    note "$TPU_NAME is $state; looking again in ${BABYSIT_INTERVAL_S}s"
  fi
  $DRY_RUN && exit 0
  sleep "$BABYSIT_INTERVAL_S"
done
