#!/usr/bin/env bash
# One worker's setup, run over ssh by tpu_setup/setup.sh from the synced code directory: a venv with
# diffjax[tpu,gcs] at the versions pinned in tpu_setup/constraints.txt (gcs: train.py reads and writes
# gs:// itself), and only when --bucket is given (USE_GCSFUSE=true) the bucket mounted with gcsfuse.
# Running it again redoes nothing that is done (and remounts a bucket lost to a reboot).
#
#   tpu_setup/worker/setup.sh --python python3.11 [--bucket NAME --mount-dir DIR [-- GCSFUSE_FLAGS...]]
set -euo pipefail
cd "$(dirname "$0")/../.."

python=python3.11 bucket="" mount_dir=""
while (($#)); do
  case $1 in
    --python) python=$2 && shift ;;
    --bucket) bucket=$2 && shift ;;
    --mount-dir) mount_dir=$2 && shift ;;
    --) shift && break ;;
    *) echo "tpu_setup/worker/setup.sh: error: unexpected argument $1" >&2 && exit 2 ;;
  esac
  shift
done
say() { echo "$(hostname): $*"; }

# unattended-upgrades runs apt for minutes after a VM boots and holds its locks: wait instead of failing.
apt_get() {
  while pgrep -x 'apt|apt-get|dpkg' >/dev/null; do
    say "waiting for another apt/dpkg (unattended-upgrades) to finish"
    sleep 10
  done
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1800 -q "$@"
}

if ! command -v "$python" >/dev/null; then
  say "installing $python"
  apt_get update && apt_get install -y "$python" "$python-venv"
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c tpu_setup/constraints.txt -e ".[tpu,gcs]"
say "venv ready: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"

[[ -n $bucket ]] || exit 0
if ! command -v gcsfuse >/dev/null; then
  say "installing gcsfuse"
  keyring=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  apt_get update && apt_get install -y gcsfuse
fi
if ! mountpoint -q "$mount_dir"; then
  sudo mkdir -p "$mount_dir"
  sudo chown "$(id -u):$(id -g)" "$mount_dir"
  gcsfuse "$@" "$bucket" "$mount_dir"
fi
say "gs://$bucket mounted at $mount_dir"
