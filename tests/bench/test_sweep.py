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
    assert gap["p_value"] < 1e-3  # Welch's t = -24.5 on 4 degrees of freedom
    assert (
        "diff - standard at their best rates: -0.2000 ± 0.0082 (standard error), Welch's t-test p = 1.6e-05: "
        "larger than seed noise (p < 0.05)"
    ) in text
    # diff's best is the largest rate and standard's the smallest: both optima may lie outside the grid
    assert diff["best_at_edge"] and summary["variants"]["standard"]["best_at_edge"]
    assert "- diff's best rate 0.002 is at the edge of the grid" in text


def test_a_best_rate_inside_the_grid_is_not_flagged():
    summary = sweep.summarize({"diff": {1e-3: [1.5, 1.6], 2e-3: [1.4, 1.45], 4e-3: [1.7, 1.8]}})
    assert not summary["variants"]["diff"]["best_at_edge"]
    assert "edge of the grid" not in sweep.markdown(summary, seeds=2)


def test_within_noise_when_welchs_test_finds_no_difference():
    summary = sweep.summarize({"diff": {1e-3: [1.0, 1.2]}, "standard": {1e-3: [1.05, 1.25]}})
    gap = summary["gaps"]["diff - standard"]
    np.testing.assert_allclose(gap["p_value"], 0.7575, atol=1e-4)  # t = -0.354 on 2 degrees of freedom
    assert not gap["beyond_noise"]


def test_one_seed_has_no_spread_to_test_against_and_claims_nothing():
    gap = sweep.summarize({"diff": {1e-3: [1.0]}, "standard": {1e-3: [2.0]}})["gaps"]["diff - standard"]
    assert np.isnan(gap["p_value"]) and not gap["beyond_noise"]


def _results(noise: float, logit_top1: float) -> dict:
    """The parts of an evaluation's results.json that the sweep reads."""
    return {
        "needles": {"accuracy": 0.25},
        "attention": {"answer": 0.1, "noise": noise},
        "outliers": {"attention_logits": {"top-1": logit_top1}, "hidden_states": {"top-1": 3.0, "median": 0.5}},
    }


def test_every_seed_of_the_best_runs_is_evaluated_once_and_the_first_seeds_compared(tmp_path, monkeypatch):
    configs = {
        (v, lr, seed): sweep.run_config(base_config(), v, lr, seed, tmp_path)
        for v in ("diff", "standard")
        for lr in (1e-3, 2e-3)
        for seed in (0, 1)
    }
    evaluated = {"diff_lr0.002_seed0": (0.2, 20.0), "diff_lr0.002_seed1": (0.4, 24.0)}
    evaluated |= {"standard_lr0.001_seed0": (0.5, 30.0), "standard_lr0.001_seed1": (0.7, 34.0)}

    def write_results(workdir: str) -> None:
        path = tmp_path / "runs" / workdir / "eval" / "400" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"tasks": _results(*evaluated[workdir])}))

    calls = []

    def evaluate(*args):  # what `python -m diffjax.evaluate --workdir=...` leaves behind
        calls.append(args)
        if args[0] == "diffjax.evaluate" and args[1].startswith("--workdir="):
            write_results(files.path(args[1].removeprefix("--workdir=")).name)

    monkeypatch.setattr(sweep, "_module", evaluate)
    write_results("standard_lr0.001_seed1")  # evaluated before: not again
    losses = {"diff": {1e-3: [1.5, 1.5], 2e-3: [1.4, 1.4]}, "standard": {1e-3: [1.6, 1.6], 2e-3: [1.7, 1.7]}}
    summary = sweep.summarize(losses)
    summary["evaluation"] = sweep.evaluate_best(summary, configs, [0, 1], tmp_path)
    summary["evaluation_gaps"] = sweep.evaluation_gaps(summary["evaluation"])
    run = {name: tmp_path / "runs" / name for name in evaluated}
    assert calls == [
        ("diffjax.evaluate", f"--workdir={run['diff_lr0.002_seed0']}", "--needle_lengths=512"),
        ("diffjax.evaluate", f"--workdir={run['diff_lr0.002_seed1']}", "--needle_lengths=512"),
        ("diffjax.evaluate", f"--workdir={run['standard_lr0.001_seed0']}", "--needle_lengths=512"),
        ("diffjax.evaluate", "compare", f"--runs={run['diff_lr0.002_seed0']},{run['standard_lr0.001_seed0']}",
         f"--out={tmp_path / 'compare'}"),
    ]  # fmt: skip
    noise = summary["evaluation"]["diff"]["noise share"]
    np.testing.assert_allclose([noise["mean"], noise["std"]], [0.3, np.sqrt(0.02)])
    assert summary["evaluation"]["standard"]["attention logit top-1"]["values"] == [30.0, 34.0]
    logits = summary["evaluation_gaps"]["diff - standard"]["attention logit top-1"]
    np.testing.assert_allclose([logits["gap"], logits["standard_error"]], [-10.0, 2.828427], rtol=1e-6)
    assert not logits["beyond_noise"]  # t = -3.54 on 2 degrees of freedom: p = 0.072
    table = sweep.markdown(summary, seeds=2)
    assert "| | diff | standard | diff - standard |" in table
    assert "| attention logit top-1 | 22.000 ± 2.828 | 32.000 ± 2.828 | -10.000 (p = 0.072) |" in table
    assert "| needle accuracy | 0.250 ± 0.000 | 0.250 ± 0.000 | +0.000 (p = nan) |" in table


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
    first = results["variants"]["diff"]["learning_rates"]["0.001"]["values"]
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
