import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_train_cli_trains_evaluates_logs_and_samples(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py:diff",
            f"--config.workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.total_steps=30",
            "--config.warmup_steps=5",
            "--config.batch_size=8",
            "--config.seq_len=64",
            "--config.log_every_steps=10",
            "--config.eval_every_steps=20",
            "--config.eval_batches=2",
            "--config.sample_tokens=16",
            "--config.model.num_layers=2",
            "--config.profile_start_step=3",
            "--config.profile_steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record in records:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "grad_norm"} <= record.keys()
        assert record["tokens_per_s"] > 0 and record["learning_rate"] > 0
    evals = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 30
    assert "validation loss" in result.stdout and "sample: 'The " in result.stdout
    assert "train step per device: arguments" in result.stdout  # the compiled step's memory analysis
    assert list((workdir / "profile").rglob("*.xplane.pb"))  # the jax.profiler trace of steps 3-4
    assert {"param_norm", "step_time_s", "tokens_per_s_per_device", "tflops_per_device", "mfu"} <= records[0].keys()


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"--config.workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.learning_rate=1e30",
            "--config.end_learning_rate=0",
            "--config.warmup_steps=0",
            "--config.grad_clip_norm=1e30",
            "--config.total_steps=20",
            "--config.batch_size=4",
            "--config.seq_len=32",
            "--config.model.num_layers=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: step ") and "is not finite; the update was not applied" in last, last


KEYS_DOCUMENTED = "base_config() in diffjax/config.py lists every key with its default"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.modle.num_layers=2", "unknown config key 'modle.num_layers'; did you mean 'model.num_layers'?"),
        ("--config.model.num_layer=2", "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
        ("--config.total_step=5", "unknown config key 'total_step'; did you mean 'total_steps'?"),
        ("--config.zzzz=1", "unknown config key 'zzzz'"),
    ],
)
def test_a_misspelt_key_is_named_with_the_nearest_one_in_one_clean_line(override, message):
    command = [sys.executable, str(REPO / "train.py"), "--config=configs/tiny.py:standard", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"train.py: error: {message}; {KEYS_DOCUMENTED}\n"
