"""`python -m diffjax.bench parity`: bad input is one line and exit code 2, before anything is trained."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--parity_variants=diff,linear", "variant 'linear' is unknown; choose from ['diff', 'diff_gqa', 'standard']"),
        ("--parity_steps=5", "--parity_steps=5 must be at least 10"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(flag, message):
    command = [sys.executable, "-m", "diffjax.bench", "parity", flag]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"python -m diffjax.bench: error: {message}"
