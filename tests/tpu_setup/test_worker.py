"""tpu_setup/worker/run.sh on this machine: a detached run that is found again, and stop touches only it."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

RUN = REPO / "tpu_setup" / "worker" / "run.sh"
# Stands in for train.py: on SIGTERM it says so and exits 0, as train.py does once its checkpoint is saved.
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(print("saved")))
print("up", flush=True)
time.sleep(120)
"""
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


@pytest.fixture
def worker(tmp_path):
    env = dict(os.environ, DIFFJAX_RUNS=str(tmp_path))

    def run(*args: str) -> str:
        result = subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    yield run
    for pid_file in tmp_path.glob("*/group"):  # nothing outlives a failed test
        subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_run_starts_once_stops_with_sigterm_and_leaves_other_processes_alone(worker, tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert "started r1" in worker("start", "r1", "--", sys.executable, "-c", TRAINER)
        assert worker("status", "r1") == "running"
        assert "already running" in worker("start", "r1", "--", sys.executable, "-c", TRAINER)
        wait_for(lambda: "up" in worker("log", "r1"))
        assert worker("status", "other") == "absent"
        assert worker("stop", "other") == f"{os.uname().nodename}: other is not running"

        assert "r1 stopped (exit 0)" in worker("stop", "r1", "30")
        assert worker("status", "r1") == "stopped"
        assert bystander.poll() is None
        log = worker("log", "r1")
        assert log.splitlines()[-1] == f"{os.uname().nodename}: saved"
        assert log.count("starts:") == 1  # the second start did not start anything
    finally:
        bystander.kill()


def test_a_run_that_ignores_sigterm_is_killed_after_the_timeout(worker):
    worker("start", "r2", "--", sys.executable, "-c", STUBBORN)
    wait_for(lambda: worker("status", "r2") == "running")
    assert "did not stop within 1s: killed" in worker("stop", "r2", "1")
    wait_for(lambda: worker("status", "r2") != "running")


def test_the_exit_code_is_kept_and_a_restart_is_not_a_stop(worker):
    worker("start", "r3", "--", "bash", "-c", "exit 3")
    wait_for(lambda: worker("status", "r3") == "exited 3")
    worker("stop", "r3", "5", "--restart")
    assert worker("status", "r3") == "exited 3"


def test_a_missing_mount_refuses_to_start(tmp_path):
    result = subprocess.run(
        ["bash", str(RUN), "start", "r4", "--mount", str(tmp_path), "--", "true"],
        capture_output=True,
        text=True,
        env=dict(os.environ, DIFFJAX_RUNS=str(tmp_path)),
    )
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"{tmp_path} is not mounted (run tpu_setup/setup.sh); not starting on the local disk\n"
    )


def recorder(bin_dir, name: str, body: str = "") -> None:
    """A command NAME on PATH that appends its name and arguments to $CALLS, then runs `body`."""
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
    (bin_dir / name).chmod(0o755)


@pytest.fixture
def worker_copy(tmp_path):
    """A checkout with one worker script in it, commands on PATH that record their calls, and a run function."""
    repo, bin_dir, calls = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls"
    (repo / "tpu_setup" / "worker").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    env = dict(os.environ, CALLS=str(calls), PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path / "home"))

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        copy = repo / "tpu_setup" / "worker" / script
        copy.write_text((RUN.parent / script).read_text())
        return subprocess.run(["bash", str(copy), *args], capture_output=True, text=True, env=env, timeout=60)

    def recorded() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return repo, bin_dir, run, recorded


@pytest.mark.parametrize("bucket", [False, True])
def test_the_worker_setup_installs_the_gcs_extra_and_mounts_only_when_asked(worker_copy, bucket):
    repo, bin_dir, run, recorded = worker_copy
    recorder(repo / ".venv" / "bin", "python", 'if [[ $1 == -c ]]; then echo "jax 0.10.2"; fi')
    for name in ("python3.11", "sudo", "apt-get", "curl", "gcsfuse"):
        recorder(bin_dir, name)
    recorder(bin_dir, "mountpoint", "exit 1")  # nothing mounted yet
    mount = ["--bucket", "dj-bucket", "--mount-dir", "/mnt/gcs", "--", "--implicit-dirs"] if bucket else []
    result = run("setup.sh", "--python", "python3.11", *mount)
    assert result.returncode == 0, result.stderr
    pip = [call for call in recorded() if call.startswith("python -m pip install")]
    assert pip[-1] == "python -m pip install -q -c tpu_setup/constraints.txt -e .[tpu,gcs]"
    rest = [call.split()[0] for call in recorded() if not call.startswith("python")]
    if bucket:
        assert rest == ["mountpoint", "sudo", "sudo", "gcsfuse"]  # gcsfuse is installed here: mkdir, chown, mount
        assert recorded()[-1] == "gcsfuse --implicit-dirs dj-bucket /mnt/gcs"
        assert result.stdout.splitlines()[-1].endswith(": gs://dj-bucket mounted at /mnt/gcs")
    else:
        assert rest == []  # no apt, no gcsfuse, no sudo
        assert result.stdout.splitlines()[-1].endswith(": venv ready: jax 0.10.2")


# Stands in for tensorflow_datasets: a builder that prints to stdout (as TFDS does), downloads into
# data_dir/downloads and writes its dataset under data_dir/NAME/CONFIG/VERSION, dataset_info.json among the files.
FAKE_TFDS = """
import os

class Builder:
    def __init__(self, name, data_dir, file_format):
        assert file_format == "array_record", file_format
        name, _, version = name.partition(":")
        if name == "broken":
            raise RuntimeError("no such dataset")
        self.root, self.data_dir = data_dir, os.path.join(data_dir, name, version or "1.0.0")

    def download_and_prepare(self):
        print("Downloading and preparing dataset to", self.data_dir)
        os.makedirs(os.path.join(self.root, "downloads"), exist_ok=True)
        open(os.path.join(self.root, "downloads", "raw.txt"), "w").close()
        os.makedirs(self.data_dir, exist_ok=True)
        for name in ("c4-train.array_record-00000-of-00001", "features.json", "dataset_info.json"):
            with open(os.path.join(self.data_dir, name), "w") as f:
                f.write(name)

def builder(name, data_dir, file_format):
    return Builder(name, data_dir, file_format)
"""
# Stands in for gcloud storage: gs://BUCKET/PATH is $BUCKETS/BUCKET/PATH; rsync honours --exclude (a Python
# regex on the path under the source); after each call the bucket's files are appended to $CALLS.
FAKE_GCLOUD = """
import os, re, shutil, sys
args = sys.argv[1:]
buckets = os.environ["BUCKETS"]
local = lambda url: os.path.join(buckets, url.removeprefix("gs://"))
assert args[:2] in (["storage", "rsync"], ["storage", "cp"]), args
words = [a for a in args[2:] if not a.startswith("-")]
if args[1] == "rsync":
    assert "--recursive" in args, args
    excludes = [a.removeprefix("--exclude=") for a in args if a.startswith("--exclude=")]
    source, target = words
    for root, _, names in os.walk(source):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), source)
            if not any(re.search(x, relative) for x in excludes):
                os.makedirs(os.path.dirname(local(os.path.join(target, relative))), exist_ok=True)
                shutil.copy(os.path.join(root, name), local(os.path.join(target, relative)))
else:
    (source, target) = words
    os.makedirs(os.path.dirname(local(target)), exist_ok=True)
    shutil.copy(source, local(target))
files = sorted(os.path.relpath(os.path.join(r, n), buckets) for r, _, ns in os.walk(buckets) for n in ns)
with open(os.environ["CALLS"], "a") as calls:
    calls.write("bucket: " + " ".join(files) + "\\n")
"""


@pytest.fixture
def prepare_data(worker_copy, tmp_path):
    """worker/prepare_data.sh with the fake TFDS in the venv's Python and the fake gcloud on PATH."""
    repo, bin_dir, run, recorded = worker_copy
    (tmp_path / "fake_tfds").mkdir()
    (tmp_path / "fake_tfds" / "tensorflow_datasets.py").write_text(FAKE_TFDS)
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "fake_tfds"} exec {sys.executable} "$@"\n')
    venv_python.chmod(0o755)
    (tmp_path / "gcloud.py").write_text(FAKE_GCLOUD)
    recorder(bin_dir, "gcloud", f'BUCKETS={tmp_path / "buckets"} exec {sys.executable} {tmp_path / "gcloud.py"} "$@"')
    (tmp_path / "buckets" / "dj-bucket").mkdir(parents=True)
    return lambda *args: run("prepare_data.sh", *args), recorded


def test_prepare_data_builds_locally_then_copies_with_dataset_info_last(prepare_data, tmp_path):
    run, recorded = prepare_data
    result = run("c4/en:3.1.0", "gs://dj-bucket/tfds/")
    assert result.returncode == 0, result.stderr
    built = tmp_path / "home" / "diffjax-datasets"  # on this machine's disk, downloads included
    assert sorted(p.name for p in (built / "c4" / "en" / "3.1.0").iterdir()) == [
        "c4-train.array_record-00000-of-00001",
        "dataset_info.json",
        "features.json",
    ]
    assert (built / "downloads" / "raw.txt").exists()
    dataset = "dj-bucket/tfds/c4/en/3.1.0"
    shard, info, features = (
        f"{dataset}/{name}" for name in ("c4-train.array_record-00000-of-00001", "dataset_info.json", "features.json")
    )
    assert recorded() == [
        f"gcloud storage rsync --recursive --exclude=(^|/)dataset_info\\.json$ {built}/c4/en/3.1.0 gs://{dataset}",
        f"bucket: {shard} {features}",  # everything but dataset_info.json: not yet "prepared" for TFDS
        f"gcloud storage cp {built}/c4/en/3.1.0/dataset_info.json gs://{info}",
        f"bucket: {shard} {info} {features}",
    ]
    assert result.stdout.splitlines()[-1].endswith(
        f": c4/en:3.1.0 is prepared in gs://{dataset} (the local build in {built} can be deleted)"
    )
    assert "Downloading and preparing dataset" in result.stderr  # TFDS's own output, kept apart from the path


@pytest.mark.parametrize("args", [["broken", "gs://dj-bucket/tfds"], ["lm1b", "/mnt/gcs/tfds"], ["lm1b"]])
def test_prepare_data_copies_nothing_when_it_cannot_build(prepare_data, args):
    run, recorded = prepare_data
    result = run(*args)
    assert result.returncode != 0
    assert recorded() == []
    if args[0] == "broken":
        assert "RuntimeError: no such dataset" in result.stderr
    else:
        assert result.stderr == "tpu_setup/worker/prepare_data.sh: error: usage: prepare_data.sh NAME gs://BUCKET/DIR\n"
