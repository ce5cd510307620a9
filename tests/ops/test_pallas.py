"""The fused Pallas kernels through `diffjax.ops.pallas`: the TPU kernels interpreted on CPU (and on the TPU
simulator) against the reference, outputs and every gradient including lambda's."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # the simulator's race record
from jax.experimental.pallas import tpu as pltpu

from diffjax.ops import pallas, reference

BF16_TOLERANCE = 2e-2  # bf16 kernels vs the float32 reference on the same inputs (bf16 has 8 mantissa bits)


def _inputs(batch, length, heads, kv_heads, width, dtype, seed=0, segments=True):
    rng = np.random.default_rng(seed)
    q1, q2 = (rng.standard_normal((batch, length, heads, width)) for _ in range(2))
    k1, k2 = (rng.standard_normal((batch, length, kv_heads, width)) for _ in range(2))
    v = rng.standard_normal((batch, length, kv_heads, 2 * width))
    arrays = tuple(jnp.asarray(x, dtype) for x in (q1, q2, k1, k2, v))
    segment_ids = None
    if segments:  # several documents per row, then padding (a fully masked tail)
        ids = np.sort(rng.integers(1, 4, size=(batch, length)), axis=1)
        ids[:, length - max(1, length // 5) :] = 0
        segment_ids = jnp.asarray(ids, jnp.int32)
    return arrays, jnp.asarray(0.37, dtype), segment_ids


def _kernel(block_q=16, block_k=32):
    """The fused kernels of the platform the tests run on: compiled on a GPU/TPU (tiles no smaller than the
    family compiles), the TPU kernels interpreted on CPU."""
    platform = jax.default_backend()
    if platform != "cpu":
        smallest = pallas.KERNELS[platform].MIN_BLOCK
        block_q, block_k = max(block_q, smallest), max(block_k, smallest)
    return pallas.kernel_for(platform, 8, jnp.float32, block_q, block_k)


@functools.partial(jax.jit, static_argnames="core", compiler_options={"xla_backend_optimization_level": 0})
def _value_and_grads(arrays, scalars, segment_ids, cotangent, core):
    """`core(*arrays, *scalars, segment_ids)` and its gradients with respect to arrays and scalars."""

    def f(arrays, scalars):
        return core(*arrays, *scalars, segment_ids)

    out, vjp = jax.vjp(f, arrays, scalars)
    return out, vjp(cotangent)


def _compare(arrays, lam, segment_ids, kernel, atol, rtol=0.0):
    """Fused output and gradients against the reference's, computed in float32 from the same inputs."""
    cotangent = jax.random.normal(jax.random.key(1), (*arrays[0].shape[:3], arrays[4].shape[-1]), arrays[0].dtype)
    fused = functools.partial(pallas.diff_attention, kernel=kernel)
    got = _value_and_grads(arrays, (lam,), segment_ids, cotangent, fused)
    exact = jax.tree.map(lambda x: x.astype(jnp.float32), (arrays, (lam,), cotangent))
    want = _value_and_grads(*exact[:2], segment_ids, exact[2], reference.diff_attention)
    names = ["out", "dq1", "dq2", "dk1", "dk2", "dv", "dlambda"]
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        scale = max(1.0, float(np.abs(w).max()))  # dlambda sums over every row: compare it relatively
        np.testing.assert_allclose(g / scale, w / scale, atol=atol, rtol=rtol, err_msg=name)
    return got


@pytest.mark.accelerator
@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 80),
    kv_heads=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2, 4]),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
    segments=st.booleans(),
)
def test_matches_the_reference_in_float32(batch, length, kv_heads, rep, blocks, segments):
    arrays, lam, segment_ids = _inputs(batch, length, kv_heads * rep, kv_heads, 8, jnp.float32, segments=segments)
    _compare(arrays, lam, segment_ids, _kernel(*blocks), atol=1e-5)


@pytest.mark.accelerator
def test_matches_the_reference_in_bfloat16_with_odd_lengths_and_gqa():
    arrays, lam, segment_ids = _inputs(2, 45, 4, 2, 8, jnp.bfloat16, seed=3)
    got = _compare(arrays, lam, segment_ids, _kernel(16, 32), atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(got))


def test_the_gpu_kernels_meet_the_same_contract_through_the_wrapper():
    """`tests/ops/test_pallas_gpu.py` checks the Triton kernels alone; here the shared layout, padding and VJP."""
    arrays, lam, segment_ids = _inputs(2, 45, 4, 2, 8, jnp.float32, seed=3)
    _compare(arrays, lam, segment_ids, pallas.kernel_for("gpu", 8, jnp.float32, 16, 32, interpret=True), atol=1e-5)


@pytest.mark.accelerator
def test_standard_attention_is_the_one_branch_case():
    (q, _, k, _, v), _, segment_ids = _inputs(2, 40, 4, 2, 8, jnp.float32, seed=4)
    cotangent = jax.random.normal(jax.random.key(2), (*q.shape[:3], v.shape[-1]))
    fused = functools.partial(pallas.attention, kernel=_kernel(16, 16))
    got = _value_and_grads((q, k, v), (), segment_ids, cotangent, fused)
    want = _value_and_grads((q, k, v), (), segment_ids, cotangent, reference.attention)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.accelerator
def test_padding_rows_are_zero_with_zero_gradients_never_nan():
    arrays, lam, _ = _inputs(1, 32, 2, 1, 8, jnp.float32, seed=5, segments=False)
    segment_ids = jnp.zeros((1, 32), jnp.int32).at[:, :10].set(1)
    fused = functools.partial(pallas.diff_attention, kernel=_kernel(16, 16))
    out, (grads, _) = _value_and_grads(arrays, (lam,), segment_ids, jnp.ones((1, 32, 2, 16)), fused)
    assert np.all(np.isfinite(out)) and np.all(out[:, 10:] == 0)
    for grad in grads[:2]:  # queries of padding rows
        assert np.all(np.isfinite(grad)) and np.all(grad[:, 10:] == 0)


@pytest.mark.accelerator
@pytest.mark.parametrize(("dtype", "width"), [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_default_tiles_at_model_head_widths_and_a_length_off_the_tile_grid(dtype, width):
    """The kernels as the dispatcher builds them (the family's default tiles for the width and dtype), GQA,
    packed segments, at a length that is no multiple of any tile: T = 1000 on a device, 45 interpreted."""
    platform = jax.default_backend()
    length = 45 if platform == "cpu" else 1000
    arrays, lam, segment_ids = _inputs(1, length, 4, 2, width, dtype, seed=8)
    tolerance = 1e-5 if dtype == jnp.float32 else BF16_TOLERANCE
    _compare(arrays, lam, segment_ids, pallas.kernel_for(platform, width, dtype), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_tpu_simulator_with_shuffled_parallel_axes_and_race_detection_agrees(seed):
    """Parallel grid axes run in a random order and uninitialised memory is NaN: a kernel that relied on the
    order of a "parallel" axis or read scratch before writing it would fail here."""
    simulator = pltpu.InterpretParams(
        random_seed=seed, detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2
    )
    arrays, lam, segment_ids = _inputs(1, 64, 4, 2, 8, jnp.float32, seed=6)
    _compare(arrays, lam, segment_ids, pallas.kernel_for("cpu", 8, jnp.float32, 16, 32, simulator), atol=1e-5)
    assert not interpret_pallas_call.races.races_found


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ((96, 128), "block_q=96 must be a power of two"),
        ((128, 64), "block_k=64 is below the tpu kernels' smallest tile, 128"),
        ((128, 0), None),
    ],
)
def test_tile_sizes_are_powers_of_two_and_zero_means_the_default(blocks, message):
    if message:
        with pytest.raises(ValueError, match=message):
            pallas.kernel_for("tpu", 128, jnp.bfloat16, *blocks)
    else:
        kernel = pallas.kernel_for("tpu", 128, jnp.bfloat16, *blocks)
        assert (kernel.block_q, kernel.block_k, kernel.interpret) == (128, 512, False)


def test_under_shard_map_on_a_mesh_the_gradients_match_one_device():
    """Batch over fsdp and heads over tensor (2 x 2 CPU devices): outputs and gradients, lambda's summed over
    the shards, equal the single-device reference."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_attention.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    for name, error in report["max_errors"].items():
        assert error < 1e-4, (name, error)
