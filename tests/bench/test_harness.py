"""`python -m diffjax.bench harness`: requests/s of diffjax's harness LM and of lm-eval's hf model."""

import subprocess
import sys

import pytest
from conftest import REPO, save_run

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")


@pytest.mark.slow
def test_harness_bench_times_both_lms_on_every_request_type(tmp_path):
    save_run(tmp_path / "run", [1])
    command = [sys.executable, "-m", "diffjax.bench", "harness", f"--workdir={tmp_path / 'run'}", "--count=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = dict(pair.split("=") for pair in result.stdout.strip().splitlines()[-1].split())
    for lm in ("diffjax_cold", "diffjax_warm", "hf"):
        for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            assert float(last[f"{lm}_{kind}"]) > 0
    assert "loglikelihood          8 " in result.stdout  # 2 items x 4 choices


def test_harness_bench_without_a_workdir_is_one_line_and_exit_code_2():
    command = [sys.executable, "-m", "diffjax.bench", "harness"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "--workdir is required" in result.stderr
