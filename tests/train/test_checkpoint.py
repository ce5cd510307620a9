"""Checkpointing end to end through `train.py`: exact resume, preemption, damage, meshes, fine-tuning."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import numpy as np
import pytest
from conftest import REPO, free_port, save_run
from conftest import SHORT_RUN as RUN
from conftest import SHORT_RUN_STEPS as STEPS

from diffjax.cli import RunFailure
from diffjax.config import ConfigError, load_config_file
from diffjax.parallel.mesh import make_mesh
from diffjax.train.checkpoint import RunCheckpoints, check_shapes, find_checkpoint, run_metadata
from diffjax.train.state import create_state, make_trainer

EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def command(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"--config.workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *RUN,
        *extra,
    ]


def train(workdir: Path, data_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(workdir, data_dir, *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def records(workdir: Path, name: str = "metrics") -> list[dict]:
    return [json.loads(line) for line in (workdir / f"{name}.jsonl").read_text().splitlines()]


def trajectory(workdir: Path) -> list[tuple]:
    """Per-step values that must agree bitwise between runs (timings excluded)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in records(workdir)]


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


PARAMS_SCRIPT = """
import sys, numpy as np
from flax import nnx, traverse_util
from diffjax import load_model
model, _ = load_model(sys.argv[1])
np.savez(sys.argv[2], **traverse_util.flatten_dict(nnx.to_pure_dict(model.params), sep="/"))
"""


def params_of(workdir: Path, env: dict | None = None) -> dict[str, np.ndarray]:
    """The parameters `load_model` gives in a fresh process (with `env`, e.g. 8 devices)."""
    out = workdir.parent / f"{workdir.name}-params.npz"
    result = subprocess.run(
        [sys.executable, "-c", PARAMS_SCRIPT, str(workdir), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


def same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """Run A: 12 uninterrupted steps, checkpoints at 5, 10 and 12."""
    workdir = tmp_path_factory.mktemp("run_a") / "run"
    result = train(workdir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [5, 10, 12]
    return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_sigkill_then_rerun_reproduces_the_uninterrupted_run_bitwise(finished_run, data_dir, tmp_path):
    workdir = tmp_path / "run_b"
    process = subprocess.Popen(command(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "5").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "run B ended before its step-5 checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert max(checkpoint_steps(workdir)) < STEPS  # killed mid-run

    result = train(workdir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resuming at step (5|10) from ", result.stdout), result.stdout
    assert trajectory(workdir) == trajectory(finished_run)
    assert records(workdir, "eval") == records(finished_run, "eval")
    assert same_params(params_of(finished_run), params_of(workdir))


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_sigterm_finishes_the_step_saves_and_exits_zero_then_resumes(finished_run, data_dir, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").is_file() or not records(workdir):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    saved = re.search(r"saved step (\d+) to (\S+); run again to resume", stdout)
    assert saved, stdout
    step = int(saved.group(1))
    assert 1 <= step < STEPS and Path(saved.group(2)) == workdir / "checkpoints" / str(step)
    assert max(checkpoint_steps(workdir)) == step and "SIGTERM: stopping after this step" in stderr

    result = train(workdir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {step} from " in result.stdout
    assert trajectory(workdir) == trajectory(finished_run)


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(data_dir, tmp_path):
    """Two processes x 2 CPU devices: JAX's preemption sync tells every host the step to stop and save at."""
    workdir, port = tmp_path / "run", free_port()
    distributed = [f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def start(process_id: int) -> subprocess.Popen:
        flags = [*distributed, f"--config.distributed.process_id={process_id}", "--config.total_steps=60"]
        return subprocess.Popen(
            command(workdir, data_dir, *flags), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    workers = [start(0), start(1)]
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").is_file() or len(records(workdir)) < 2:
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            pytest.fail(b"the run ended early: ".join(w.communicate()[1][-2000:] for w in workers).decode())
        time.sleep(0.01)
    workers[1].send_signal(signal.SIGTERM)
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    saved = re.search(rb"saved step (\d+) to ", outputs[0][0])
    assert saved, outputs[0][0][-2000:]
    step = int(saved.group(1))
    assert checkpoint_steps(workdir) == [step] and step < 60
    files = sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*.json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_a_truncated_latest_checkpoint_is_skipped_for_the_previous_one(finished_run, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    largest = max((workdir / "checkpoints" / "12" / "params").rglob("*"), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)

    result = train(workdir, data_dir, f"--config.total_steps={STEPS + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: checkpoint {workdir / 'checkpoints' / '12'} is unreadable" in result.stderr
    assert "resuming at step 10 from " in result.stdout
    assert checkpoint_steps(workdir)[-1] == STEPS + 2
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints.damaged").iterdir()] == ["12"]


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_no_usable_checkpoint_stops_the_run_unless_restarting_from_scratch_is_asked(finished_run, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    for step in checkpoint_steps(workdir):
        (workdir / "checkpoints" / str(step) / "metadata" / "metadata").write_text("{")
    result = train(workdir, data_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: no usable checkpoint in ")
    assert checkpoint_steps(workdir) == [5, 10, 12]  # nothing moved or deleted

    result = train(workdir, data_dir, "--config.total_steps=2", "--config.restart_from_scratch=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [2] and len(list((workdir / "checkpoints.damaged").iterdir())) == 3


@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_a_model_that_does_not_fit_the_checkpoint_is_rejected_and_nothing_changes(finished_run, data_dir, tmp_path):
    before = tree_digest(finished_run)
    result = train(finished_run, data_dir, "--config.model.mlp_dim=384")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: the checkpoint ") and len(lines[-1]) < 400, lines[-1]
    mismatch = r"parameter blocks/mlp/\w+/kernel is \(4, 352, 128\) there and \(4, 384, 128\) here"
    assert re.search(mismatch, lines[-1])
    assert tree_digest(finished_run) == before
    unpadded = train(finished_run, data_dir, "--config.model.vocab_multiple=1").stderr.strip().splitlines()[-1]
    assert "parameter embed/embedding is (384, 128) there and (259, 128) here" in unpadded
    assert unpadded.endswith("(runs saved before vocabulary padding need model.vocab_multiple=1)")
    assert tree_digest(finished_run) == before

    fresh = tmp_path / "finetune"  # the same check for init_from, before the new workdir exists
    for source in (finished_run, finished_run / "checkpoints" / "12"):
        result = train(fresh, data_dir, "--config.model.mlp_dim=384", f"--config.init_from={source}")
        assert result.returncode == 2 and re.search(mismatch, result.stderr.strip().splitlines()[-1])
        assert not fresh.exists()


@pytest.mark.slow
def test_checkpoints_restore_on_other_meshes_and_init_from_starts_fresh(data_dir, tmp_path):
    """Saved on 8 devices as (2, 2, 2); restored on 1 device and as (1, 8, 1); fine-tuned from on 1 device."""
    source = tmp_path / "mesh222"
    steps = ["--config.total_steps=3", "--config.checkpoint_every_steps=0"]
    result = train(source, data_dir, *steps, "--config.mesh.shape=(2,2,2)", env=EIGHT_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    one_device = train(source, data_dir, *steps)  # a finished run: restores, evaluates, stops
    eight = train(source, data_dir, *steps, "--config.mesh.shape=(1,8,1)", env=EIGHT_DEVICES)
    for run in (one_device, eight):
        assert run.returncode == 0 and "resuming at step 3 from " in run.stdout, run.stderr[-3000:]
    evals = records(source, "eval")  # step 0 and step 3 of the run, then one evaluation per restore
    assert [e["step"] for e in evals] == [0, 3, 3, 3]
    # The parameters are bitwise equal (below); the loss sums over tokens in another order on another mesh.
    assert evals[2]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)
    assert evals[3]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)
    assert same_params(params_of(source), params_of(source, EIGHT_DEVICES))

    finetune = tmp_path / "finetune"
    init_from = f"--config.init_from={source / 'checkpoints' / '3'}"
    result = train(finetune, data_dir, *steps[2:], "--config.total_steps=2", init_from)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer and step start afresh" in result.stdout
    assert records(finetune, "eval")[0] == {"step": 0, "eval_loss": evals[2]["eval_loss"]}  # as on one device
    assert [r["step"] for r in records(finetune)] == [1, 2]


@pytest.mark.xdist_group("finished_run")  # one worker builds the module's `finished_run`
def test_find_checkpoint_accepts_a_workdir_its_checkpoints_or_a_step(finished_run, tmp_path):
    checkpoints = finished_run / "checkpoints"
    assert find_checkpoint(finished_run) == (checkpoints, 12)
    assert find_checkpoint(checkpoints) == (checkpoints, 12)
    assert find_checkpoint(checkpoints / "5") == (checkpoints, 5)
    with pytest.raises(ConfigError, match="no checkpoint at "):
        find_checkpoint(tmp_path)


def test_check_shapes_names_the_first_mismatch():
    check_shapes({"a": (1,), "b": (2, 3)}, {"a": (1,), "b": (2, 3)}, "x")
    with pytest.raises(ConfigError, match=r"parameter b is \(2, 3\) there and \(2, 4\) here"):
        check_shapes({"a": (1,), "b": (2, 3)}, {"a": (1,), "b": (2, 4)}, "x")
    with pytest.raises(ConfigError, match="parameter c is absent there and"):
        check_shapes({"a": (1,)}, {"a": (1,), "c": (1,)}, "x")


def test_retention_keeps_the_latest_and_every_keep_period_th_step(tmp_path):
    save_run(tmp_path, list(range(1, 10)), keep_checkpoints=2, keep_period=4)
    assert checkpoint_steps(tmp_path) == [4, 8, 9]


def test_a_failed_save_names_its_step_and_the_checkpoint_left_whole(tmp_path, monkeypatch):
    """Orbax reports an asynchronous write's failure at the next save or wait: named as that write's step."""
    config = load_config_file(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
    mesh = make_mesh((1, -1, 1))
    trainer = make_trainer(config, mesh)
    state = create_state(config, trainer)
    checkpoints = RunCheckpoints(tmp_path, config, run_metadata(config, mesh))
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpoints.save(5, state, data)
    checkpoints.wait()

    def unreachable(*args, **kwargs):
        raise OSError("Connection refused\nsecond line")

    monkeypatch.setattr(checkpoints.manager, "save", unreachable)
    with pytest.raises(RunFailure) as failed:
        checkpoints.save(10, state, data)
    assert str(failed.value).startswith(f"saving the checkpoint of step 10 to {tmp_path / 'checkpoints'} failed ")
    assert "(Connection refused); step 5 is the latest complete checkpoint: run the same command again" in str(
        failed.value
    )
    monkeypatch.undo()

    checkpoints.save(10, state, data)  # in flight when the next save finds it failed
    monkeypatch.setattr(checkpoints.manager, "check_for_errors", unreachable)
    with pytest.raises(RunFailure, match=r"^saving the checkpoint of step 10 to .* step 5 is the latest complete"):
        checkpoints.save(15, state, data)
    monkeypatch.undo()
    checkpoints.close()
