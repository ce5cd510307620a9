#!/usr/bin/env bash
# One TFDS dataset prepared on this worker, run over ssh by tpu_setup/prepare_data.sh from the synced code
# directory: TFDS builds NAME as array_record into a directory on this VM's disk (its array_record writer
# writes local files only, never gs://), then `gcloud storage` copies the dataset's directory to the bucket,
# its dataset_info.json last: TFDS (and train.py) take that file as "prepared", so a copy cut short is never
# read as a dataset. Running it again reuses the local build and copies only what the bucket lacks.
#
#   tpu_setup/worker/prepare_data.sh NAME gs://BUCKET/DIR
#
# The local directory is ~/diffjax-datasets (DIFFJAX_DATASETS overrides); delete it once the copy is done.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() {
  echo "tpu_setup/worker/prepare_data.sh: error: $*" >&2
  exit 2
}
(($# == 2)) && [[ $2 == gs://?* ]] || fail "usage: prepare_data.sh NAME gs://BUCKET/DIR"
name=$1 destination=${2%/}
local_dir=${DIFFJAX_DATASETS:-$HOME/diffjax-datasets}
host=$(hostname)

# Prints the dataset's directory under local_dir (NAME/CONFIG/VERSION); TFDS's own messages go to stderr.
build='import contextlib, os, sys
import tensorflow_datasets as tfds
name, data_dir = sys.argv[1:]
builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare()
print(os.path.relpath(builder.data_dir, data_dir))'
echo "$host: building $name in $local_dir"
dataset=$(.venv/bin/python -c "$build" "$name" "$local_dir")
[[ -n $dataset && -f $local_dir/$dataset/dataset_info.json ]] || fail "$host: TFDS left no dataset_info.json for $name"
echo "$host: copying $local_dir/$dataset to $destination/$dataset"
gcloud storage rsync --recursive --exclude='(^|/)dataset_info\.json$' "$local_dir/$dataset" "$destination/$dataset"
gcloud storage cp "$local_dir/$dataset/dataset_info.json" "$destination/$dataset/dataset_info.json"
echo "$host: $name is prepared in $destination/$dataset (the local build in $local_dir can be deleted)"
