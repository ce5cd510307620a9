#!/usr/bin/env bash
# One worker's side of a run, called over ssh by launch.sh, stop.sh, logs.sh and babysit.sh:
#
#   run.sh start RUN_ID [--mount DIR] -- COMMAND...  run COMMAND detached, unless RUN_ID already runs here;
#                                                    refuse when DIR is not a mount point
#   run.sh stop RUN_ID [TIMEOUT_S] [--restart]       SIGTERM (train.py saves a checkpoint and exits), SIGKILL
#                                                    of its process group after TIMEOUT_S (default 600);
#                                                    --restart: about to start again, so status is not "stopped"
#   run.sh status RUN_ID                             running | stopped (by stop) | exited CODE | absent
#   run.sh log RUN_ID [LINES] [--follow]             the tail of the run's log, lines prefixed by host name
#
# State lives in ~/diffjax-runs/RUN_ID (DIFFJAX_RUNS overrides): pid, group, exit, stopped, train.log. Only
# processes whose environment holds DIFFJAX_RUN_ID=RUN_ID are ever signalled, never anything else.
set -euo pipefail

fail() {
  echo "tpu_setup/worker/run.sh: error: $*" >&2
  exit 2
}
(($# >= 2)) || fail "usage: run.sh start|stop|status|log RUN_ID ..."
action=$1 run_id=$2
shift 2
dir=${DIFFJAX_RUNS:-$HOME/diffjax-runs}/$run_id
log=$dir/train.log
host=$(hostname)

ours() { [[ -r /proc/$1/environ ]] && tr '\0' '\n' <"/proc/$1/environ" | grep -qx "DIFFJAX_RUN_ID=$run_id"; }

running() { [[ -f $dir/pid ]] && ours "$(<"$dir/pid")"; }

start() {
  local mount=""
  if [[ ${1:-} == --mount ]]; then
    mount=$2
    shift 2
  fi
  if [[ ${1:-} != -- ]] || (($# < 2)); then fail "usage: run.sh start RUN_ID [--mount DIR] -- COMMAND..."; fi
  shift
  if [[ -n $mount ]] && ! mountpoint -q "$mount"; then
    fail "$host: $mount is not mounted (run tpu_setup/setup.sh); not starting on the local disk"
  fi
  mkdir -p "$dir"
  if running; then
    echo "$host: $run_id is already running (pid $(<"$dir/pid"))"
    return
  fi
  rm -f "$dir/pid" "$dir/exit" "$dir/stopped"
  echo "=== $(date -u +%FT%TZ) $host starts: $*" >>"$log"
  # A new session (its own process group) that outlives the ssh connection; the wrapper records the exit code.
  # shellcheck disable=SC2016 # expanded by the wrapper shell
  DIFFJAX_RUN_ID=$run_id setsid nohup bash -c '"$@" & echo $! >"$0/pid"; wait $!; echo $? >"$0/exit"' \
    "$dir" "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$dir/group"
  for _ in {1..50}; do
    [[ -f $dir/pid ]] && break
    sleep 0.1
  done
  echo "$host: started $run_id (pid $(<"$dir/pid")), log $log"
}

stop() {
  local timeout=${1:-600} waited=0
  mkdir -p "$dir"
  if [[ ${2:-} != --restart ]]; then touch "$dir/stopped"; fi # tells babysit.sh the run was stopped on purpose
  if ! running; then
    echo "$host: $run_id is not running"
    return
  fi
  kill -TERM "$(<"$dir/pid")"
  while running && ((waited < timeout)); do
    sleep 1
    waited=$((waited + 1))
  done
  if running; then
    local group
    group=$(<"$dir/group")
    if ours "$group"; then kill -KILL -- "-$group"; else kill -KILL "$(<"$dir/pid")"; fi
    echo "$host: $run_id did not stop within ${timeout}s: killed"
  else
    echo "$host: $run_id stopped (exit $(cat "$dir/exit" 2>/dev/null || echo unknown))"
  fi
}

status() {
  if running; then
    echo running
  elif [[ -f $dir/stopped ]]; then
    echo stopped
  elif [[ -f $dir/exit ]]; then
    echo "exited $(<"$dir/exit")"
  else
    echo absent
  fi
}

show_log() {
  local lines=${1:-100} follow=()
  if [[ ${2:-} == --follow ]]; then follow=(-F); fi
  [[ -f $log ]] || fail "$host: no log for $run_id"
  tail -n "$lines" "${follow[@]}" "$log" | sed -u "s/^/$host: /"
}

case $action in
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status ;;
  log) show_log "$@" ;;
  *) fail "unknown action $action; use start, stop, status or log" ;;
esac
