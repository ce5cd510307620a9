"""`python -m diffjax.bench kernels`: tiny CPU runs in-process, the FLOP numerator, bad flags, TPU compilation."""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from diffjax.bench import kernels
from diffjax.cli import UsageError
from diffjax.ops import reference

TINY = kernels.Shape(batch=1, length=128, heads=2, kv_heads=1, head_dim=64)
NUMBER = r"[0-9.]+(?:e[+-]?[0-9]+)?"


def test_the_flop_numerator_is_spec_units_of_causal_t2d_per_head_and_row():
    """SPEC section 5: fused forward 6, backward 14 units of T^2 d multiply-adds per head; x2 FLOPs, /2 causal."""
    shape = kernels.Shape(batch=3, length=1024, heads=8, kv_heads=2, head_dim=128)
    per_head_and_row = 2 * 1024**2 * 128 / 2 * 3 * 8
    assert kernels.useful_flops(shape, backward=False) == 6 * per_head_and_row
    assert kernels.useful_flops(shape, backward=True) == (6 + 14) * per_head_and_row


def test_shapes_move_the_same_tokens_at_every_length():
    shapes = kernels.shapes([4096, 1024, 16384], [128, 64], heads=8, kv_heads=8, tokens=16384)
    assert [(s.length, s.head_dim, s.batch) for s in shapes[:3]] == [(1024, 64, 16), (1024, 128, 16), (4096, 64, 4)]
    assert shapes[-1] == kernels.Shape(1, 16384, 8, 8, 128)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.shapes([0], [64], 8, 8, 16384), "--lengths must be positive"),
        (lambda: kernels.shapes([128], [64], 8, 3, 16384), "--kernel_heads=8 must be a positive multiple"),
        (lambda: kernels.check_variants(["fused", "flash3"]), "--variants must name some of"),
    ],
)
def test_bad_settings_are_usage_errors(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_the_xla_variants_compute_the_reference_differential_attention():
    """The benchmark compares like with like: `four_dpa` (split V, `o1 - lam o2` as `two_flash` combines) and
    `blockwise` match the reference; the Pallas kernels are checked against it in tests/ops."""
    args = kernels.inputs(TINY)
    expected = np.asarray(reference.diff_attention(*args[:6]), np.float32)
    for variant in ("four_dpa", "blockwise"):
        out = kernels.core(variant, "cpu", TINY.head_dim, interpret=True)(*args[:6])
        assert out.shape == expected.shape and out.dtype == args[4].dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05, err_msg=variant)


def test_cpu_run_skips_pallas_prints_a_table_and_ends_with_key_values(capsys):
    kernels.run([TINY], ["fused", "four_dpa", "blockwise"], warmup=0, iterations=1, interpret=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("skipped fused: Pallas kernels only run interpreted on CPU")
    assert any(line.startswith("| four_dpa | ") for line in lines) and not any(
        line.startswith("| fused") for line in lines
    )
    assert re.fullmatch(
        rf"seq_len=128 head_dim=64 four_dpa_fwd_bwd_ms={NUMBER} blockwise_fwd_bwd_ms={NUMBER}", lines[-1]
    )


def test_interpreted_run_labels_pallas_times_and_reports_the_fused_speedup(capsys):
    kernels.run([TINY], ["fused", "blockwise"], warmup=0, iterations=1, interpret=True)
    out = capsys.readouterr().out
    assert "| fused (interpreted) | " in out and "say nothing about kernel speed" in out
    assert "fused vs best alternative (blockwise): fwd " in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"seq_len=128 head_dim=64 fused_fwd_bwd_ms=({NUMBER}) blockwise_fwd_bwd_ms=({NUMBER}) "
        rf"fused_speedup_fwd_bwd=({NUMBER})",
        last,
    )
    assert match, last
    assert float(match[3]) == pytest.approx(float(match[2]) / float(match[1]), rel=1e-3)


def test_a_bad_flag_is_one_error_line_and_exit_code_2():
    command = [sys.executable, "-m", "diffjax.bench", "kernels", "--lengths=1024,x"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m diffjax.bench: error: --lengths"), result.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)
def test_the_fused_kernel_compiles_forward_and_backward_for_a_v5e_device(capsys):
    from diffjax.train.aot import topology_devices

    devices = topology_devices("v5e:2x2")
    shape = kernels.Shape(batch=1, length=256, heads=2, kv_heads=2, head_dim=128)
    kernels.run_compile([shape], ["fused"], "v5e:2x2", devices)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("forward+backward, no timing") and "v5" in lines[0]
    assert any(line.startswith("| fused | yes | ") for line in lines), lines
    assert re.fullmatch(rf"compiled=1 failed=0 fused_temp_mib={NUMBER}", lines[-1]), lines[-1]
