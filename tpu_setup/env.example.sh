# shellcheck shell=bash disable=SC2034
# Every tpu_setup script reads this file: copy it to tpu_setup/env.sh (git ignores that name) and edit it,
# or point the scripts at another copy with --env FILE or TPU_SETUP_ENV=FILE. Only this file counts:
# variables of the same names in your shell are ignored.

# --- required -------------------------------------------------------------------------------------------
PROJECT=my-project                  # gcloud project id
ZONE=us-west4-a                     # a zone that offers the accelerator (and, for spot/reserved, your quota)
ACCELERATOR_TYPE=v5litepod-8        # v5e: v5litepod-<chips>; v5p: v5p-<2 x chips>, e.g. v5p-64 is 32 chips
RUNTIME_VERSION=v2-alpha-tpuv5-lite # v5e: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e
TPU_NAME=diffjax-v5e                # the TPU VM, or the queued resource (and its node, or node prefix)
BUCKET=my-diffjax-bucket            # gs://BUCKET, in the zone's region: checkpoints, TensorBoard, data
RUN_ID=paper-830m-001               # one training run: its workdir is gs://BUCKET/runs/RUN_ID
CONFIG=configs/paper_830m.py        # what train.py trains (--config=...)

# --- optional (defaults shown) ----------------------------------------------------------------------------
# CAPACITY=on-demand                # on-demand, spot (preemptible, cheaper) or reserved (your reservation)
# NUM_SLICES=1                      # > 1: a multislice queued resource of NUM_SLICES x ACCELERATOR_TYPE
# QUEUED=false                      # true: a queued resource even for one slice (waits for capacity)
# SERVICE_ACCOUNT=                  # the workers' service account (empty: the project's default one)
# CREATE_FLAGS=()                   # more gcloud create flags, e.g. (--network=my-net --internal-ips)
# TRAIN_ARGS=()                     # more train.py flags, e.g. (--config.total_steps=20000 "--config.mesh.shape=(1,-1,4)")
# PYTHON=python3.11                 # interpreter for the workers' venv (installed with apt when missing)
# REMOTE_DIR=diffjax                # the code's directory on each worker, under the home directory
# USE_GCSFUSE=false                 # true: also mount the bucket on every worker (gcsfuse), paths through it
# MOUNT_DIR=/mnt/gcs                # where the bucket is mounted (USE_GCSFUSE=true)
# GCSFUSE_FLAGS=(--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0)
# WORKDIR=gs://$BUCKET/runs/$RUN_ID # train.py's --config.workdir ($MOUNT_DIR/runs/$RUN_ID with gcsfuse)
# DATA_DIR=gs://$BUCKET/tensorflow_datasets  # --config.data.data_dir: datasets prepared once, read by every
#                                   # run ($MOUNT_DIR/tensorflow_datasets with gcsfuse)
# CREATE_RETRIES=10                 # create attempts before giving up (no capacity, a failed request)
# RETRY_DELAY_S=120                 # pause between attempts
# POLL_S=30                         # how often to look at a slice that is being created
# BABYSIT_INTERVAL_S=300            # how often babysit.sh checks the slice and the run
# STOP_TIMEOUT_S=600                # stop.sh: seconds for the final checkpoint before SIGKILL
