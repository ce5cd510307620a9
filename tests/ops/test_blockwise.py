"""Blockwise attention equals the dense reference (outputs and gradients), and its memory grows linearly in T.

Tolerances. float32: rtol 1e-5 with an atol floor of 1e-5 x the largest magnitude among the case's
output and gradients: entries are sums of terms that cancel (all of them when a query sees one key, where
dq is exactly 0), so an entry near zero carries the rounding error of the terms it sums, which are of the
size of the other entries, not of its own. `d lam` is one sum over every output element, so its floor is
1e-5 x the L2 norm of its terms `o2 * dO` (the size of its rounding error). bfloat16: both
implementations are compared with the float32 reference on the same (bf16-rounded) inputs, errors scaled
as above; blockwise must be within 2^-5 (bf16 keeps 8 significant bits; a few roundings of tiles and
sums stay well inside 8 ulps) and within twice the reference's own bf16 error plus one rounding, 2^-8
(the reference rounds logits to bf16, blockwise keeps them in float32, so it is usually closer).

XLA compilation dominates this file's run time on CPU, so the comparisons are compiled at backend
optimisation level 0 (LLVM's; the HLO and its numerics are unchanged), which halves it, and the reference
is compiled apart from blockwise so that it is reused across block sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.ops import blockwise, reference

RTOL = 1e-5
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _segments(seed: int, batch: int, length: int) -> np.ndarray:
    """Packed rows: a few documents of random lengths, then a padded (0) tail of random length."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        real = rng.integers(0, length + 1)
        starts = np.zeros(length, np.int32)
        starts[rng.integers(0, length, size=3)] = 1
        rows.append(np.where(np.arange(length) < real, 1 + np.cumsum(starts), 0))
    return np.stack(rows).astype(np.int32)


def _inputs(seed, batch, length, heads, kv_heads, width, *, differential, dtype=jnp.float32):
    """Arguments before `segment_ids` ((q1, q2, k1, k2, v, lam) or (q, k, v)) and an output cotangent.

    Drawn with numpy: eager `jax.random` compiles a program per new shape, seconds per test on CPU.
    """
    rng = np.random.default_rng(seed)
    # Queries of standard deviation 2 give logits of standard deviation ~2: peaked enough that the online max matters.
    q1, q2 = (2 * rng.standard_normal((batch, length, heads, width)) for _ in range(2))
    k1, k2 = (rng.standard_normal((batch, length, kv_heads, width)) for _ in range(2))
    v = rng.standard_normal((batch, length, kv_heads, 2 * width))
    lam = rng.uniform(0.1, 0.9)
    cotangent = jnp.asarray(rng.standard_normal((batch, length, heads, 2 * width)), jnp.float32)
    args = (q1, q2, k1, k2, v, lam) if differential else (q1, k1, v)
    return tuple(jnp.asarray(x, dtype) for x in args), cotangent


def _outputs_and_grads(fn, args, segment_ids, cotangent):
    """`fn`'s output and the gradients of `<output, cotangent>` with respect to every argument."""

    def loss(args):
        out = fn(*args, segment_ids)
        return jnp.vdot(out.astype(jnp.float32), cotangent), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return (out, *grads)


def _core(module, args):
    """The module's differential or standard attention, whichever `args` are for."""
    return module.diff_attention if len(args) == 6 else module.attention


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"), compiler_options=_FAST_COMPILE)
def _blockwise(args, segment_ids, cotangent, *, block_q, block_k):
    """Blockwise output + gradients."""
    core = functools.partial(_core(blockwise, args), block_q=block_q, block_k=block_k)
    return _outputs_and_grads(core, args, segment_ids, cotangent)


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _reference(args, segment_ids, cotangent):
    """Reference output + gradients, the float32 reference on the upcast arguments (bf16 only), and the
    scale of `d lam`'s terms (None for plain attention)."""
    upcast = tuple(x.astype(jnp.float32) for x in args)
    dense = _outputs_and_grads(_core(reference, args), args, segment_ids, cotangent)
    exact = (
        None
        if args[0].dtype == jnp.float32
        else _outputs_and_grads(_core(reference, args), upcast, segment_ids, cotangent)
    )
    lam_scale = None
    if len(args) == 6:
        q2, k2, v = upcast[1], upcast[3], upcast[4]
        lam_scale = jnp.linalg.norm(reference.attention(q2, k2, v, segment_ids) * cotangent)
    return dense, exact, lam_scale


def _compare(args, segment_ids, cotangent, block_q, block_k):
    """Blockwise results, then `_reference`'s. Block sizes are clamped to T as blockwise does, to share compilations."""
    length = args[0].shape[1]
    ours = _blockwise(args, segment_ids, cotangent, block_q=min(block_q, length), block_k=min(block_k, length))
    return ours, *_reference(args, segment_ids, cotangent)


def _scales(expected, lam_scale) -> list[float]:
    """Error scale per output/gradient: the largest magnitude of them all, and for `d lam` its terms' L2 norm."""
    largest = max(float(np.max(np.abs(np.asarray(x, np.float32)), initial=0.0)) for x in expected[:6])
    return [float(lam_scale) if index == 6 else largest for index in range(len(expected))]


def _check_f32(args, segment_ids, cotangent, block_q, block_k) -> None:
    """Blockwise == reference to RTOL with the atol floors of the module docstring."""
    ours, theirs, _, lam_scale = _compare(args, segment_ids, cotangent, block_q, block_k)
    for index, (actual, expected, scale) in enumerate(zip(ours, theirs, _scales(theirs, lam_scale), strict=True)):
        actual, expected = np.asarray(actual), np.asarray(expected)
        assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=f"output/grad {index}")


def _check_bf16(args, segment_ids, cotangent, block_q, block_k) -> None:
    """Blockwise bf16 against the float32 truth, with the bounds of the module docstring."""
    ours, theirs, exact, lam_scale = _compare(args, segment_ids, cotangent, block_q, block_k)
    for index, (actual, dense, truth, scale) in enumerate(
        zip(ours, theirs, exact, _scales(exact, lam_scale), strict=True)
    ):
        assert actual.dtype == dense.dtype == jnp.bfloat16 and actual.shape == truth.shape
        truth = np.asarray(truth)
        our_error = np.max(np.abs(np.asarray(actual, np.float32) - truth)) / scale
        dense_error = np.max(np.abs(np.asarray(dense, np.float32) - truth)) / scale
        assert our_error <= min(2**-5, 2 * dense_error + 2**-8), f"output/grad {index}: {our_error} vs {dense_error}"


# (batch, T, heads, kv_heads, width, block_q, block_k, packed, differential)
CASES = [
    (1, 1, 2, 1, 4, 512, 512, False, True),
    (2, 1, 2, 2, 4, 1, 1, True, False),
    (2, 7, 4, 2, 8, 3, 4, True, True),  # blocks do not divide T, block_q != block_k
    (1, 7, 4, 1, 8, 7, 7, False, False),
    (2, 128, 4, 4, 8, 32, 64, False, True),  # blocks divide T
    (2, 128, 4, 2, 8, 48, 40, True, False),
    (1, 1000, 4, 1, 8, 256, 96, True, True),  # GQA n_rep 4, blocks do not divide T
    (1, 1000, 2, 2, 8, 200, 250, True, False),
]


@pytest.mark.parametrize(("batch", "length", "heads", "kv_heads", "width", "bq", "bk", "packed", "differential"), CASES)
def test_matches_reference_float32(batch, length, heads, kv_heads, width, bq, bk, packed, differential):
    args, cotangent = _inputs(length, batch, length, heads, kv_heads, width, differential=differential)
    segment_ids = jnp.asarray(_segments(length, batch, length)) if packed else None
    _check_f32(args, segment_ids, cotangent, bq, bk)


@pytest.mark.parametrize(("length", "bq", "bk", "differential"), [(7, 3, 2, True), (300, 64, 48, False)])
def test_matches_reference_bfloat16(length, bq, bk, differential):
    args, cotangent = _inputs(1, 2, length, 4, 2, 8, differential=differential, dtype=jnp.bfloat16)
    _check_bf16(args, jnp.asarray(_segments(2, 2, length)), cotangent, bq, bk)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    length=st.sampled_from([1, 6, 17, 40]),
    block_q=st.integers(1, 48),
    block_k=st.integers(1, 48),
    heads=st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 1), (4, 2)]),  # (query heads, kv heads)
    differential=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_property(length, block_q, block_k, heads, differential, seed):
    args, cotangent = _inputs(seed, 2, length, *heads, 4, differential=differential)
    _check_f32(args, jnp.asarray(_segments(seed, 2, length)), cotangent, block_q, block_k)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    args, cotangent = _inputs(0, 2, 10, 4, 2, 8, differential=True)
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0, 0, 0, 0, 0], [0] * 10])
    out, *grads = (np.asarray(x) for x in _blockwise(args, segment_ids, cotangent, block_q=4, block_k=3))
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(grad)) for grad in grads)
    assert np.all(out[0, 5:] == 0) and np.all(out[1] == 0) and np.all(np.abs(out[0, :5]) > 0)
    for grad in grads[:5]:  # padding positions neither receive nor pass on gradient
        assert np.all(grad[0, 5:] == 0) and np.all(grad[1] == 0) and np.any(grad[0, :5] != 0)
    assert grads[5] != 0


def _temp_bytes(fn, length: int) -> int:
    """Temporary bytes XLA allocates for forward + backward of differential attention at sequence `length`."""
    q = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    v = jax.ShapeDtypeStruct((1, length, 1, 32), jnp.float32)
    lam = jax.ShapeDtypeStruct((), jnp.float32)

    def loss(*args):
        return jnp.sum(fn(*args))

    # Buffer assignment is HLO-level: the same at LLVM optimisation level 0 (checked), and faster to compile.
    compiled = jax.jit(jax.grad(loss, argnums=range(6))).lower(q, q, q, q, v, lam).compile(_FAST_COMPILE)
    stats = compiled.memory_analysis()
    if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
        pytest.skip("compiled.memory_analysis() reports no temporary sizes on this backend")
    return stats.temp_size_in_bytes


def test_memory_grows_linearly_in_sequence_length():
    ours = [_temp_bytes(blockwise.diff_attention, length) for length in (4096, 8192)]
    dense = [_temp_bytes(reference.diff_attention, length) for length in (4096, 8192)]
    assert ours[1] / ours[0] < 2.5, ours
    assert dense[1] / dense[0] > 3.5, dense
    assert ours[1] * 20 < dense[1], (ours, dense)
