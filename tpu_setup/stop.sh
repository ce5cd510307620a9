#!/usr/bin/env bash
# Stop this run (RUN_ID of env.sh) on every worker: SIGTERM, so train.py saves a checkpoint and exits, then
# SIGKILL after STOP_TIMEOUT_S. Only the run's own processes are signalled. The slice keeps running (and
# costing): delete.sh removes it. babysit.sh ends when it sees the run stopped this way.
#
#   tpu_setup/stop.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"

ssh_workers all "$(remote bash tpu_setup/worker/run.sh stop "$RUN_ID" "$STOP_TIMEOUT_S")"
