#!/usr/bin/env bash
# Prepare a TFDS dataset once into the bucket's data dir (DATA_DIR, read by every later run), on worker 0,
# which has the venv and the bucket mounted. Written as array_record, the format the data pipeline reads.
#
#   tpu_setup/prepare_data.sh [--env FILE] [--dry-run] NAME      e.g. lm1b, or c4/en:3.1.0
#
# Then train on it with TRAIN_ARGS=(--config.data.source=NAME ...). Our own sources (diffjax_corpus,
# text_files, needles) need no preparation: train.py builds them into DATA_DIR on first use.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
load_env
((${#ARGS[@]} == 1)) || die "give one TFDS dataset name, e.g. tpu_setup/prepare_data.sh lm1b"
[[ -n $DATA_DIR ]] || die "DATA_DIR is empty: set USE_GCSFUSE=true (or DATA_DIR) in $ENV_NAME"

build='import sys, tensorflow_datasets as tfds
tfds.builder(sys.argv[1], data_dir=sys.argv[2], file_format="array_record").download_and_prepare()'
ssh_workers 0 "$(remote .venv/bin/python -c "$build" "${ARGS[0]}" "$DATA_DIR")"
