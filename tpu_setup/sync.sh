#!/usr/bin/env bash
# Copy this checkout to ~/REMOTE_DIR on every worker: the files git tracks or would track (not .venv, runs/,
# env.sh or anything else .gitignore names), uncommitted edits included. Files are overwritten, none are
# removed; a worker's .venv stays.
#
#   tpu_setup/sync.sh [--env FILE] [--dry-run]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_options_and_env "$@"
git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO is not a git checkout (sync.sh asks git which files to copy)"

archive=diffjax-code-$RUN_ID.tar.gz
local_archive=${TMPDIR:-/tmp}/$archive
# shellcheck disable=SC2016 # $1 and $2 belong to the inner shell
run bash -c 'git -C "$1" ls-files -z --cached --others --exclude-standard | tar -C "$1" --null -T - -czf "$2"' \
  pack "$REPO" "$local_archive"
if queued; then
  run gcloud compute tpus queued-resources scp "$local_archive" "$TPU_NAME:$archive" "${LOCATION[@]}" \
    --worker=all --node=all
else
  run gcloud compute tpus tpu-vm scp "$local_archive" "$TPU_NAME:$archive" "${LOCATION[@]}" --worker=all
fi
ssh_workers all "mkdir -p $(quote "$REMOTE_DIR") && tar -xzf $archive -C $(quote "$REMOTE_DIR") && rm $archive"
run rm -f "$local_archive"
