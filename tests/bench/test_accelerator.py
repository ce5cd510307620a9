"""`python -m diffjax.bench accelerator`: the quick suite passes on CPU and writes the documented report; a stage
that overruns is killed with the finished stages kept; bad input is refused before anything is written."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from conftest import REPO

from diffjax.bench import stages
from diffjax.bench.accelerator import STAGE_NAMES, render_markdown

STAGE_KEYS = {"status", "seconds", "budget_s", "error", "log", "results"}


def _suite(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffjax.bench", "accelerator", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _report(out: Path) -> dict:
    report = json.loads((out / "results.json").read_text())
    assert report["schema"] == 1 and set(report) == {"schema", "command", "started", "budget_s", "quick", "stages"}
    for outcome in report["stages"].values():
        assert set(outcome) == STAGE_KEYS and (out / outcome["log"]).is_file()
    return report


@pytest.mark.slow
def test_the_quick_suite_passes_every_stage_on_cpu_and_reports_each_figure(tmp_path):
    out = tmp_path / "quick"
    started = time.monotonic()
    result = _suite(f"--out={out}", "--quick")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = _report(out)
    assert report["quick"] and list(report["stages"]) == list(STAGE_NAMES)
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(STAGE_NAMES, "passed")
    assert elapsed < report["budget_s"] + 10
    stages = {name: outcome["results"] for name, outcome in report["stages"].items()}

    assert stages["environment"]["platform"] == "cpu" and stages["environment"]["versions"]["jax"]
    assert [row["attention_impl"] for row in stages["environment"]["dispatch"]] == ["blockwise", "blockwise"]
    assert stages["correctness"]["counts"]["passed"] == 2 and stages["correctness"]["counts"]["failed"] == 0
    rows = stages["kernels"]["kernels"]
    assert {row["variant"] for row in rows} == {"fused", "two_flash", "four_dpa", "blockwise"}
    assert all(row["fwd_bwd_ms"] > 0 for row in rows)
    assert len(stages["kernels"]["tile_sweep"]) == 2 and len(stages["kernels"]["tile_winner"]) == 1
    steps = {row["attention_type"]: row for row in stages["train_step"]["train_step"]}
    assert set(steps) == {"diff", "standard"} and all(row["losses_finite"] for row in steps.values())
    assert steps["diff"]["remat_policy"] == "none" and steps["diff"]["tokens_per_s"] > 0
    assert {row["target"]: row["met"] for row in stages["train_step"]["targets"]} == {
        "mfu": "n/a",
        "diff_overhead": "n/a",
    }
    end = stages["end_to_end"]
    assert end["resumed_at_checkpoint"] and end["trajectory_bitwise_equal"] and end["final_params_bitwise_equal"]
    assert end["load_model"] == {"step": 8, "platforms": ["cpu"], "finite": True}

    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Accelerator check: 1 x cpu, jax ")
    assert all(f"\n## {name}\n" in markdown for name in STAGE_NAMES)


@pytest.mark.slow
def test_a_stage_stops_at_its_deadline_with_its_pytest_and_the_stages_before_it_are_kept(tmp_path):
    """Full-size correctness (minutes on CPU) gets 80% of 30 s: it stops pytest at its deadline itself."""
    out = tmp_path / "short"
    started = time.monotonic()
    result = _suite(f"--out={out}", "--budget_s=30", "--stages=environment,correctness")
    assert time.monotonic() - started < 45
    assert result.returncode == 1, result.stderr[-3000:]
    report = _report(out)
    assert report["stages"]["environment"]["status"] == "passed"
    assert report["stages"]["environment"]["results"]["platform"] == "cpu"
    stopped = report["stages"]["correctness"]
    assert stopped["status"] == "timeout" and stopped["error"].startswith("pytest stopped at the deadline")
    assert "| correctness | timeout |" in (out / "results.md").read_text()
    lingering = subprocess.run(["pgrep", "-f", f"junitxml={out}"], capture_output=True, text=True).stdout
    assert not lingering.strip(), "the stopped stage's pytest is still running"


def test_a_stage_that_ignores_its_deadline_is_killed_at_its_share(tmp_path):
    """The environment stage does not watch the clock; importing JAX alone takes longer than 0.5 s."""
    out = tmp_path / "killed"
    result = _suite(f"--out={out}", "--budget_s=0.5", "--stages=environment")
    assert result.returncode == 1, result.stderr[-3000:]
    killed = _report(out)["stages"]["environment"]
    assert killed["status"] == "timeout" and killed["error"].startswith("killed at its 0 s share of the budget")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--out is required"),
        (["--budget_s=0"], "--budget_s=0.0 must be a positive number of seconds"),
        (["--stages=kernels,warp"], "--stages: unknown stage(s) ['warp']; choose from environment, correctness"),
        (["--out_exists"], "exists and is not an empty directory; name a new one"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    if args == ["--out_exists"]:
        out.mkdir()
        (out / "keep.txt").write_text("earlier run")
        args = []
    result = _suite(*([f"--out={out}"] if "--out is required" not in message else []), *args, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]


BARE_MACHINE = """
import sys
for name in ("sentencepiece", "matplotlib", "torch", "transformers", "safetensors", "hypothesis", "libtpu"):
    sys.modules[name] = None  # what the H200 machine may lack: importing any of them now raises ImportError
import diffjax.bench.__main__, diffjax.bench.stages, diffjax.train.loop, diffjax.evaluate.load
"""


def test_the_suite_and_the_training_path_import_without_optional_packages():
    """The suite, train.py's loop and load_model must run where only jax, flax, optax, orbax, grain, TFDS,
    ml-collections and tensorboardX are installed (../shared/device/wheels.sh brings the last four)."""
    result = subprocess.run([sys.executable, "-c", BARE_MACHINE], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_train_step_stage_takes_the_first_policy_that_fits_and_halves_layers_only_if_none_does(
    tmp_path, monkeypatch
):
    """What an accelerator's memory decides, with the out-of-memory errors XLA raises simulated."""
    fits = {(2, "full")}  # of the tiny config's 4 layers, only 2 layers with full remat fit

    def time_steps(config, device, steps):
        if (config.model.num_layers, config.model.remat_policy) not in fits:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
        return [0.5] * steps, [5.0], 1.25

    monkeypatch.setattr(stages, "_time_steps", time_steps)
    log = stages.StageLog(tmp_path / "train_step.json", deadline=time.time() + 60)
    config = stages.load_config_file(REPO / "configs" / "tiny.py")
    row = stages._fitting_step(log, config, stages.REMAT_ORDER, jax.devices()[0], steps=3)
    assert (row["layers"], row["remat_policy"], row["step_s"]) == (2, "full", 0.5)
    assert row["tokens_per_s"] == config.batch_size * config.seq_len / 0.5 and row["memory_gib"] == 1.25
    tried = [(a["layers"], a["remat_policy"], a["outcome"]) for a in log.results["attempts"]]
    assert tried == [(4, p, "out of memory") for p in stages.REMAT_ORDER] + [
        (2, "none", "out of memory"),
        (2, "minimal", "out of memory"),
        (2, "save_attention", "out of memory"),
        (2, "full", "fits"),
    ]
    assert json.loads(log.path.read_text())["results"]["attempts"][-1]["outcome"] == "fits"

    monkeypatch.setattr(stages, "_time_steps", lambda *args: 1 / 0)  # anything else is the stage's failure
    with pytest.raises(ZeroDivisionError):
        stages._fitting_step(log, config, stages.REMAT_ORDER, jax.devices()[0], steps=3)


def test_the_markdown_report_has_a_summary_row_per_stage_and_tables_for_row_lists():
    report = {
        "command": "python -m diffjax.bench accelerator --out=x",
        "started": "2026-12-01T00:00:00+00:00",
        "budget_s": 600.0,
        "quick": False,
        "stages": {
            "environment": {
                "status": "passed",
                "seconds": 3.0,
                "budget_s": 30.0,
                "error": None,
                "log": "stages/environment.log",
                "results": {"devices": {"kind": "NVIDIA H200", "count": 1}, "versions": {"jax": "0.11.2"}},
            },
            "kernels": {
                "status": "timeout",
                "seconds": 180.0,
                "budget_s": 180.0,
                "error": "killed at its 180 s share",
                "log": "stages/kernels.log",
                "results": {"kernels": [{"T": 1024, "variant": "fused", "fwd_ms": 0.123456}, {"T": 8, "error": "|"}]},
            },
        },
    }
    text = render_markdown(report)
    assert text.startswith("# Accelerator check: 1 x NVIDIA H200, jax 0.11.2\n")
    assert "| kernels | timeout | 180 | 180 | killed at its 180 s share |" in text
    assert "| T | variant | fwd_ms | error |" in text and "| 1024 | fused | 0.1235 |  |" in text
    assert "| 8 |  |  | / |" in text
