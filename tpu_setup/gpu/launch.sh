#!/usr/bin/env bash
# Start one process of a multi-node JAX job on any cluster (train.sbatch does it for SLURM): set the
# coordinator address, process count and this process's id, which initialize_distributed() reads
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), then run the command from the repository
# root. Run it once per node (one process drives all of its node's GPUs) with the same arguments but
# --process-id. Process 0 hosts the coordinator: HOST:PORT must be reachable from every node.
#
#   tpu_setup/gpu/launch.sh --coordinator HOST:PORT --num-processes N --process-id I [--dry-run] -- COMMAND...
#
# e.g. on each of 4 nodes, with RANK 0..3:
#   tpu_setup/gpu/launch.sh --coordinator 10.0.0.2:12355 --num-processes 4 --process-id "$RANK" \
#     -- .venv/bin/python train.py --config=configs/paper_1_4b.py --config.workdir=/shared/runs/1b
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "$0")/../lib.sh"

coordinator="" num_processes="" process_id=""
while (($#)); do
  case $1 in
    --coordinator | --num-processes | --process-id)
      [[ $# -gt 1 && $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --coordinator) coordinator=$2 ;;
        --num-processes) num_processes=$2 ;;
        *) process_id=$2 ;;
      esac
      shift
      ;;
    --dry-run) DRY_RUN=true ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unexpected argument $1 (the command goes after --)" ;;
  esac
  shift
done
[[ $coordinator =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num_processes'"
if ! [[ $process_id =~ ^[0-9]+$ ]] || ((10#$process_id >= num_processes)); then
  die "--process-id must be one of 0..$((num_processes - 1)), got '$process_id'"
fi
(($#)) || die "no command: give it after --, e.g. -- python train.py --config=..."

cd "$REPO"
command=(env JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$process_id" "$@")
if $DRY_RUN; then
  quote "${command[@]}"
  exit 0
fi
exec "${command[@]}" # the process itself gets the scheduler's signals (SIGTERM: save and exit)
