"""tpu_setup/gpu: the launcher's environment reaches initialize_distributed(), and the SLURM job's srun line."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, free_port

GPU = REPO / "tpu_setup" / "gpu"
# One process of the job: joins through the launcher's environment only, then all-gathers the process ids.
JOIN = """
import json, sys
import jax
from jax.experimental import multihost_utils
from diffjax.parallel.mesh import initialize_distributed

initialize_distributed(timeout_s=120)
ids = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))
print(json.dumps({"index": jax.process_index(), "count": jax.process_count(), "ids": ids.tolist()}))
"""


def launch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(GPU / "launch.sh"), *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_two_processes_join_through_the_launchers_environment():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM", "JAX_PROCESS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    workers = [
        subprocess.Popen(
            [str(GPU / "launch.sh"), *job, "--process-id", str(i), "--", sys.executable, "-c", JOIN],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results == [{"index": i, "count": 2, "ids": [0, 1]} for i in range(2)]


def test_the_dry_run_prints_the_environment_and_the_command():
    job = ["--coordinator", "10.0.0.2:12355", "--num-processes", "4", "--process-id", "3", "--dry-run"]
    assert launch(*job).returncode == 2  # no command yet
    result = launch(*job, "--", "python", "train.py", "--config.workdir=/shared/my run")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        *("env", "JAX_COORDINATOR_ADDRESS=10.0.0.2:12355", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=3"),
        *("python", "train.py", "--config.workdir=/shared/my run"),
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coordinator", "10.0.0.2", "--num-processes", "2", "--process-id", "0"], "--coordinator must be HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes must be a positive"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be one of 0..1"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id"], "--process-id needs a value"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message):
    result = launch(*args, "--", "true")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"tpu_setup/gpu/launch.sh: error: {message}")


def test_the_slurm_job_starts_one_launcher_per_task_with_the_first_node_as_coordinator(tmp_path):
    (tmp_path / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[7-8]")
    env.update(SLURM_SUBMIT_DIR=str(REPO))
    result = subprocess.run(
        ["bash", str(GPU / "train.sbatch"), "--dry-run", "--config=configs/paper_1_4b.py"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    srun = shlex.split(result.stdout)
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[5:] == ["task", "gpu-node-7:12355", ".venv/bin/python", "train.py", "--config=configs/paper_1_4b.py"]
    # What one task runs, with SLURM's per-task variables (its launcher in dry-run):
    script = srun[4].replace("launch.sh", "launch.sh --dry-run")
    task = subprocess.run(
        ["bash", "-c", script, *srun[5:]],
        capture_output=True,
        text=True,
        env=dict(os.environ, SLURM_NTASKS="2", SLURM_PROCID="1"),
        cwd=REPO,
    )
    assert task.returncode == 0, task.stderr
    assert shlex.split(task.stdout)[1:4] == [
        "JAX_COORDINATOR_ADDRESS=gpu-node-7:12355",
        "JAX_NUM_PROCESSES=2",
        "JAX_PROCESS_ID=1",
    ]
