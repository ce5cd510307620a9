"""The GPU Pallas kernels (interpret mode on CPU) equal the dense reference, and they lower to Triton.

The kernels are called as the shared wrapper calls them: heads-major, branches stacked, `deltas`
computed from the forward's outputs, `d lam = -sum(deltas[1])`. The oracle is `reference` under
`jax.vjp` in float32 (on the bf16-rounded inputs for bf16 cases).

Tolerances (errors relative to a case's scale: the largest magnitude among its output and gradients;
for `d lam`, a sum over every output element, the L2 norm of its terms `o_2 * dO`). float32: rtol 1e-5
with an atol floor of 1e-5 x scale (near-zero entries are sums of cancelling terms of the size of the
others). bfloat16: max error <= 2^-6 x scale; the kernel rounds probabilities and dS to bf16 before
their matmuls (SPEC 1), a few bf16 roundings (2^-9 each) of unit-size terms; measured <= 2^-8.

Every case also checks that padding rows (segment 0) give exactly zero output and gradients and that
nothing is NaN. Interpret mode compiles each kernel's grid into an XLA loop; compilation dominates the
run time on CPU, so everything is compiled at LLVM optimisation level 0 (the numerics are unchanged).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.ops import pallas_gpu, reference

pytestmark = pytest.mark.skipif(not pallas_gpu.AVAILABLE, reason="this jax has no Pallas Triton backend")
if pallas_gpu.AVAILABLE:
    from .triton_export import TRITON, cuda_mlir

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
F32_TOL = 1e-5
BF16_TOL = 2**-6


def _segments(seed: int, batch: int, length: int, empty_row: bool) -> np.ndarray:
    """Packed rows: a few documents, then a padded (0) tail; the last row all padding if `empty_row`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        starts = np.zeros(length, np.int32)
        starts[rng.integers(1, length, size=3)] = 1
        real = length - rng.integers(1, length // 4 + 1)
        rows.append(np.where(np.arange(length) < real, 1 + np.cumsum(starts), 0))
    if empty_row:
        rows[-1][:] = 0
    return np.stack(rows).astype(np.int32)


def _inputs(seed: int, n: int, batch: int, heads: int, kv_heads: int, length: int, width: int, dtype):
    """Contract-layout `(q, k, v, lam, cotangent)`; value width 2d for differential, d for standard."""
    rng = np.random.default_rng(seed)
    dv = 2 * width if n == 2 else width
    # Queries of standard deviation 2 give logits of standard deviation ~2: the online max matters.
    q = 2 * rng.standard_normal((n, batch, heads, length, width))
    k = rng.standard_normal((n, batch, kv_heads, length, width))
    v = rng.standard_normal((batch, kv_heads, length, dv))
    cotangent = rng.standard_normal((batch, heads, length, dv))
    lam = jnp.float32(rng.uniform(0.1, 0.9))
    return (*(jnp.asarray(x, dtype) for x in (q, k, v, cotangent)), lam)


def _heads_last(x: jax.Array) -> jax.Array:
    """`[..., H, T, d] <-> [..., T, H, d]`."""
    return jnp.swapaxes(x, -3, -2)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"), compiler_options=_FAST_COMPILE)
def _kernel(q, k, v, cotangent, lam, segment_ids, *, block_q: int, block_k: int):
    """Kernel output, `others`, dq, dk, dv and d lam, with `deltas` formed as the wrapper forms them."""
    blocks = {"block_q": block_q, "block_k": block_k, "interpret": jax.default_backend() != "gpu"}
    weights = jnp.reshape(-lam, (1,)) if q.shape[0] == 2 else jnp.zeros((0,), jnp.float32)
    out, others, lse = pallas_gpu.forward(q, k, v, segment_ids, weights, **blocks)
    others32 = others.astype(jnp.float32)
    first = out.astype(jnp.float32) - jnp.tensordot(weights, others32, axes=1)
    branches = jnp.concatenate([first[None], others32])
    deltas = jnp.sum(branches * cotangent.astype(jnp.float32), axis=-1)
    d_q, d_k, d_v = pallas_gpu.backward(q, k, v, segment_ids, weights, lse, cotangent, deltas, **blocks)
    d_weights = jnp.sum(deltas[1:], axis=(1, 2, 3))
    return out, others, d_q, d_k, d_v, -jnp.sum(d_weights)


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _oracle(q, k, v, cotangent, lam, segment_ids):
    """Reference output, `others`, gradients, and the scale of `d lam`'s terms, in float32."""
    q, k, v, cotangent = (x.astype(jnp.float32) for x in (q, k, v, cotangent))

    def core(q, k, v, lam):
        if q.shape[0] == 1:
            return _heads_last(reference.attention(*map(_heads_last, (q[0], k[0], v)), segment_ids))
        args = map(_heads_last, (q[0], q[1], k[0], k[1], v))
        return _heads_last(reference.diff_attention(*args, lam, segment_ids))

    out, vjp = jax.vjp(core, q, k, v, lam)
    branches = [reference.attention(*map(_heads_last, (q[b], k[b], v)), segment_ids) for b in range(1, len(q))]
    others = jnp.stack([_heads_last(x) for x in branches]) if branches else jnp.zeros((0, *out.shape))
    return (out, others, *vjp(cotangent)), jnp.linalg.norm(others * cotangent)


def _errors(seed, n, batch, heads, kv_heads, length, width, block_q, block_k, dtype, empty_row=False):
    """Run kernel and oracle on one case; check padding and dtypes; return (results, expected, scales)."""
    q, k, v, cotangent, lam = _inputs(seed, n, batch, heads, kv_heads, length, width, dtype)
    segment_ids = jnp.asarray(_segments(seed, batch, length, empty_row))
    ours = _kernel(q, k, v, cotangent, lam, segment_ids, block_q=block_q, block_k=block_k)
    expected, lam_scale = _oracle(q, k, v, cotangent, lam, segment_ids)
    for actual, like in zip(ours[:5], (v, v, q, k, v), strict=True):
        assert actual.dtype == like.dtype
    ours = [np.asarray(x, np.float32) for x in ours]
    _check_padding(np.asarray(segment_ids), *ours[:5])
    largest = max(float(np.max(np.abs(x), initial=0.0)) for x in expected[:5])
    scales = [largest] * 5 + [max(float(lam_scale), 1e-30)]
    return ours, [np.asarray(x) for x in expected], scales


def _check_padding(segment_ids, out, others, d_q, d_k, d_v) -> None:
    """Everything finite; padding rows and keys have exactly zero outputs and gradients."""
    pad = (segment_ids == 0)[:, None, :, None]  # [B, 1, T, 1] broadcasts against [(n,) B, H, T, d]
    for x in (out, others, d_q, d_k, d_v):
        assert np.all(np.isfinite(x)) and np.all(x[np.broadcast_to(pad, x.shape)] == 0)


def _check_f32(*case, empty_row=False) -> None:
    """Kernel == reference to F32_TOL with the atol floors of the module docstring."""
    ours, expected, scales = _errors(*case, jnp.float32, empty_row=empty_row)
    names = ("out", "others", "dq", "dk", "dv", "dlam")
    for name, actual, want, scale in zip(names, ours, expected, scales, strict=True):
        assert actual.shape == want.shape, name
        np.testing.assert_allclose(actual, want, rtol=F32_TOL, atol=F32_TOL * scale, err_msg=name)


# (seed, n, batch, heads, kv_heads, T, d, block_q, block_k)
F32_CASES = [
    pytest.param(0, 2, 1, 4, 2, 32, 24, 32, 32, id="diff-gqa2-one-block-d24"),
    pytest.param(1, 2, 1, 4, 1, 64, 16, 16, 32, id="diff-gqa4-bq<bk"),
    pytest.param(2, 1, 2, 4, 2, 64, 16, 32, 16, id="standard-gqa2-bq>bk"),
]


@pytest.mark.accelerator
def test_differential_mha_with_empty_row():
    """Several blocks, block_q != block_k, three documents per row and a fully padded batch row."""
    _check_f32(3, 2, 3, 2, 2, 64, 16, 32, 16, empty_row=True)


@pytest.mark.accelerator
@pytest.mark.parametrize(("seed", "n", "batch", "heads", "kv_heads", "length", "width", "bq", "bk"), F32_CASES)
def test_matches_reference_float32(seed, n, batch, heads, kv_heads, length, width, bq, bk):
    _check_f32(seed, n, batch, heads, kv_heads, length, width, bq, bk)


@pytest.mark.accelerator
@pytest.mark.parametrize(
    ("n", "heads", "kv_heads", "width"),
    [pytest.param(2, 4, 2, 32, id="diff-gqa2"), pytest.param(1, 2, 2, 24, id="standard-mha-d24")],
)
def test_matches_reference_bfloat16(n, heads, kv_heads, width):
    ours, expected, scales = _errors(4, n, 2, heads, kv_heads, 64, width, 32, 16, jnp.bfloat16)
    for index, (actual, want, scale) in enumerate(zip(ours, expected, scales, strict=True)):
        error = float(np.max(np.abs(actual - want), initial=0.0)) / scale
        assert error <= BF16_TOL, f"output/grad {index}: {error}"


@pytest.mark.accelerator
@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    n=st.sampled_from([1, 2]),
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),  # (query heads, kv heads)
    width=st.sampled_from([8, 16, 24]),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_property(n, heads, width, blocks, seed):
    _check_f32(seed, n, 1, *heads, 32, width, *blocks)


def _specs(n: int, heads: int, kv_heads: int, length: int, width: int) -> dict[str, jax.ShapeDtypeStruct]:
    """bf16 shapes of every operand of the contract."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    dv = 2 * width if n == 2 else width
    return {
        "q": jax.ShapeDtypeStruct((n, 1, heads, length, width), bf16),
        "k": jax.ShapeDtypeStruct((n, 1, kv_heads, length, width), bf16),
        "v": jax.ShapeDtypeStruct((1, kv_heads, length, dv), bf16),
        "segment_ids": jax.ShapeDtypeStruct((1, length), jnp.int32),
        "weights": jax.ShapeDtypeStruct((n - 1,), f32),
        "lse": jax.ShapeDtypeStruct((n, 1, heads, length), f32),
        "d_out": jax.ShapeDtypeStruct((1, heads, length, dv), bf16),
        "deltas": jax.ShapeDtypeStruct((n, 1, heads, length), f32),
    }


@pytest.mark.parametrize(
    ("n", "width"),
    [pytest.param(2, 128, id="diff-d128"), pytest.param(2, 96, id="diff-d96"), pytest.param(1, 128, id="std-d128")],
)
def test_lowers_to_triton(n, width):
    """Forward (one kernel) and backward (dK/dV and dQ kernels) at T=4096, bf16, GQA 2 lower to Triton;
    d=96 (the paper's 830M model) exercises the head padding to 128 (values 192 -> 256)."""
    s = _specs(n, 4, 2, 4096, width)
    blocks = dict(zip(("block_q", "block_k"), pallas_gpu.default_blocks(width, jnp.bfloat16), strict=True))
    forward = functools.partial(pallas_gpu.forward, **blocks)
    backward = functools.partial(pallas_gpu.backward, **blocks)
    operands = ("q", "k", "v", "segment_ids", "weights")
    assert cuda_mlir(forward, *(s[name] for name in operands)).count(TRITON) == 1
    operands += ("lse", "d_out", "deltas")
    assert cuda_mlir(backward, *(s[name] for name in operands)).count(TRITON) == 2


class _Device:
    def __init__(self, kind: str):
        self.device_kind = kind


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu"])
def test_default_blocks_are_valid_tiles(kind, monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: [_Device(kind)])
    for width in (64, 96, 128):
        for dtype in (jnp.bfloat16, jnp.float32):
            for block in pallas_gpu.default_blocks(width, dtype):
                assert block >= 16 and block & (block - 1) == 0
