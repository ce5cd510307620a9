"""`python -m diffjax.bench train_step`: a one-step smoke run through the CLI (no timing is asserted)."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

TINY = [
    "--emb_dim=32",
    "--num_layers=2",
    "--num_heads=2",
    "--num_kv_heads=1",
    "--mlp_dim=64",
    "--vocab_size=64",
    "--seq_len=16",
    "--batch_size=2",
    "--steps=1",
    "--warmup_steps=1",
]
NUMBER = r"([0-9.]+(?:e[+-]?[0-9]+)?)"


def _bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffjax.bench", "train_step", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_one_step_smoke_prints_tokens_per_second_and_peak_memory_last():
    result = _bench(*TINY, "--noscan_layers")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"tokens_per_s={NUMBER} peak_rss_mb={NUMBER}", last)
    assert match, last
    assert float(match[1]) > 0 and float(match[2]) > 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--seq_len=0", "seq_len=0 must be a positive integer"),
        ("--attention_impl=flash", "model.attention_impl='flash' is unknown"),
        ("--steps=0", "--steps must be positive"),
        ("--num_heads=3", "model.emb_dim=32 is not divisible by 2*model.num_heads=6"),
    ],
)
def test_a_bad_flag_is_one_error_line_and_exit_code_2(flag, message):
    result = _bench(*TINY, flag)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m diffjax.bench: error: "), result.stderr
    assert message in lines[0]


def test_compare_hf_smoke_ends_with_the_ratio():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = _bench(*TINY, "--compare_hf")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    pattern = rf"tokens_per_s={NUMBER} peak_rss_mb={NUMBER} hf_tokens_per_s={NUMBER} ratio={NUMBER}"
    match = re.fullmatch(pattern, last)
    assert match, last
    assert float(match[4]) == pytest.approx(float(match[1]) / float(match[3]), rel=1e-4)
    assert "diffjax: tokens_per_s=" in result.stdout and "hf: tokens_per_s=" in result.stdout
