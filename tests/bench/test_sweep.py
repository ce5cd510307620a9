"""`python -m diffjax.bench sweep`: the summary's arithmetic, a small sweep through the CLI that resumes, and
bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from diffjax import files
from diffjax.bench import sweep
from diffjax.config import base_config


def test_the_summary_gives_means_best_rates_and_gaps_against_seed_noise():
    losses = {
        "diff": {1e-3: [1.50, 1.52, 1.54], 2e-3: [1.40, 1.41, 1.42]},
        "standard": {1e-3: [1.60, 1.61, 1.62], 2e-3: [1.70, 1.75, 1.80]},
        "diff_nogain": {1e-3: [1.39, 1.80, 1.60], 2e-3: [1.45, 1.46, 1.47]},
    }
    summary = sweep.summarize(losses)
    diff = summary["variants"]["diff"]
    assert diff["best_learning_rate"] == 2e-3 and summary["variants"]["standard"]["best_learning_rate"] == 1e-3
    np.testing.assert_allclose(diff["learning_rates"][2e-3]["mean"], 1.41)
    np.testing.assert_allclose(diff["learning_rates"][2e-3]["std"], 0.01)  # sample standard deviation
    gap = summary["gaps"]["diff - standard"]
    np.testing.assert_allclose(gap["gap"], 1.41 - 1.61)
    np.testing.assert_allclose(gap["standard_error"], np.sqrt(0.01**2 / 3 + 0.01**2 / 3))
    assert gap["beyond_noise"]
    assert set(summary["gaps"]) == {"diff - standard", "diff_nogain - standard", "diff - diff_nogain"}
    gain = summary["gaps"]["diff - diff_nogain"]  # 1.41 vs 1.46 +- 0.01: 5 standard errors apart
    assert gain["beyond_noise"] and gain["gap"] < 0
    text = sweep.markdown(summary, seeds=3)
    assert "| diff | 1.5200 ± 0.0200 | **1.4100 ± 0.0100** |" in text
    assert "diff - standard at their best rates: -0.2000 ± 0.0082 (standard error), larger than seed noise" in text


def test_within_noise_when_the_gap_is_below_two_standard_errors():
    summary = sweep.summarize({"diff": {1e-3: [1.0, 1.2]}, "standard": {1e-3: [1.05, 1.25]}})
    assert not summary["gaps"]["diff - standard"]["beyond_noise"]


def test_the_best_runs_are_evaluated_once_and_compared(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "_module", lambda *args: calls.append(args))
    configs = {
        (v, lr, 0): sweep.run_config(base_config(), v, lr, 0, tmp_path)
        for v in ("diff", "standard")
        for lr in (1e-3, 2e-3)
    }
    summary = sweep.summarize({"diff": {1e-3: [1.5], 2e-3: [1.4]}, "standard": {1e-3: [1.6], 2e-3: [1.7]}})
    done = files.path(configs[("standard", 1e-3, 0)].workdir) / "eval" / "400" / "results.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    sweep.evaluate_best(summary, configs, 0, tmp_path)
    best_diff, best_standard = (tmp_path / "runs" / name for name in ("diff_lr0.002_seed0", "standard_lr0.001_seed0"))
    assert calls == [
        ("diffjax.evaluate", f"--workdir={best_diff}"),
        ("diffjax.evaluate", "compare", f"--runs={best_diff},{best_standard}", f"--out={tmp_path / 'compare'}"),
    ]


SMALL = [
    "--config=configs/tiny.py",
    "--config.total_steps=2",
    "--config.warmup_steps=1",
    "--config.batch_size=4",
    "--config.seq_len=32",
    "--config.eval_batches=1",
    "--config.model.num_layers=1",
    "--sweep_variants=diff,standard",
    "--sweep_learning_rates=1e-3,2e-3",
    "--sweep_seeds=0",
    "--nosweep_evaluate",
]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffjax.bench", "sweep", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_small_sweep_writes_its_results_and_the_same_command_finishes_an_interrupted_one(tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(f"--out={out}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["diff_lr0.001_seed0", "diff_lr0.002_seed0", "standard_lr0.001_seed0", "standard_lr0.002_seed0"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"diff", "standard"} and (out / "loss_vs_lr.png").stat().st_size > 0
    assert result.stdout.strip().splitlines()[-1].startswith("- diff - standard at their best rates:")
    first = results["variants"]["diff"]["learning_rates"]["0.001"]["losses"]
    assert len(first) == 1 and np.isfinite(first[0])
    assert any((out / "xla_cache").iterdir())  # runs that differ only in their seed compile once

    shutil.rmtree(out / "runs" / "diff_lr0.001_seed0")  # as if the sweep had been stopped before this run
    again = _sweep(f"--out={out}", *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 3
    assert "diff_lr0.001_seed0: training" in again.stdout
    assert json.loads((out / "results.json").read_text())["variants"] == results["variants"]  # deterministic


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--out is required: the sweep's directory (the same command resumes it)"),
        (["--out=x", "--sweep_learning_rates=fast"], "--sweep_learning_rates takes numbers and --sweep_seeds integers"),
        (["--out=x", "--sweep_variants=diff,linear"], "variant 'linear' is unknown"),
        (["--out=x", "--sweep_learning_rates=-1e-3"], "learning_rate=-0.001 must be a positive number"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2_before_anything_trains(flags, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffjax.bench", "sweep", *flags], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()
