#!/usr/bin/env bash
# Show the end of the run's log (each worker keeps its own), lines prefixed by the worker's host name.
#
#   tpu_setup/logs.sh [--env FILE] [--dry-run] [--all] [--lines N] [--follow]
#
# Worker 0 (the one that prints metrics) by default; --all: every worker.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
load_env

workers=0 lines=100 follow=()
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --all) workers=all ;;
    --follow) follow=(--follow) ;;
    --lines)
      [[ ${2:-} =~ ^[0-9]+$ ]] || die "--lines needs a number"
      lines=$2
      shift
      ;;
    *) die "unexpected argument $1" ;;
  esac
  shift
done
ssh_workers "$workers" "$(remote bash tpu_setup/worker/run.sh log "$RUN_ID" "$lines" "${follow[@]}")"
