#!/usr/bin/env bash
# Prepare a TFDS dataset once into the bucket's data dir (DATA_DIR, read by every later run), on worker 0,
# which has the venv: TFDS builds it as array_record (the format the data pipeline reads) on worker 0's
# own disk, since the array_record writer writes local files only, then it is copied to DATA_DIR on the
# bucket, its dataset_info.json last (tpu_setup/worker/prepare_data.sh).
#
#   tpu_setup/prepare_data.sh [--env FILE] [--dry-run] NAME      e.g. lm1b, or c4/en:3.1.0
#
# Then train on it with TRAIN_ARGS=(--config.data.source=NAME ...); each worker copies it to its own disk on
# first use. Our own sources (diffjax_corpus, text_files, needles) need no preparation: train.py builds them
# into DATA_DIR on first use.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
load_env
((${#ARGS[@]} == 1)) || die "give one TFDS dataset name, e.g. tpu_setup/prepare_data.sh lm1b"
destination=$(bucket_url "$DATA_DIR")
[[ -n $destination ]] || die "DATA_DIR=$DATA_DIR in $ENV_NAME is not on the bucket: leave it unset" \
  "(gs://$BUCKET/tensorflow_datasets), or keep it under MOUNT_DIR with USE_GCSFUSE=true"

ssh_workers 0 "$(remote bash tpu_setup/worker/prepare_data.sh "${ARGS[0]}" "$destination")"
