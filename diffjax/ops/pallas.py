"""Fused Pallas attention cores with the reference signatures: the TPU (Mosaic) and GPU (Triton) kernels.

This module owns everything the two kernel families share, so each of `pallas_tpu` and `pallas_gpu` holds
only its kernels: the layout change to heads-major `[n, B, H, T, d]` (n stacked branches), padding T to
the block sizes (the padded tail gets segment id 0, so no kernel ever masks a partial block), the
`custom_vjp` with its residuals, and the backward's row dots `deltas[b] = rowsum(o_b * dO)`.

The kernel contract, in heads-major layout with T a multiple of both block sizes:

    forward(q [n,B,Hq,T,d], k [n,B,Hkv,T,d], v [B,Hkv,T,dv], segment_ids [B,T] int32, weights [n-1] f32,
            *, block_q, block_k, interpret) -> (out [B,Hq,T,dv], others [n-1,B,Hq,T,dv], lse [n,B,Hq,T] f32)
    backward(q, k, v, segment_ids, weights, lse, d_out, deltas [n,B,Hq,T] f32, *, block_q, block_k,
             interpret) -> (dq, dk, dv)

`out = o_1 + sum_b weights[b-1] o_b` (differential attention: `n = 2`, `weights = [-lambda]`; standard:
`n = 1`). Branch 1 is recovered in the backward as `o_1 = out - sum_b weights[b-1] o_b` (SPEC section 5),
so differential attention saves one extra output-sized array, standard attention none. `dlambda` needs no
kernel: `d weights[b-1] = sum(deltas[b])`.
"""

import dataclasses
import functools
import math
from types import ModuleType

import jax
import jax.numpy as jnp

from diffjax.ops import pallas_gpu, pallas_tpu

KERNELS: dict[str, ModuleType] = {"tpu": pallas_tpu} | ({"gpu": pallas_gpu} if pallas_gpu.AVAILABLE else {})
# Why a family is missing from KERNELS; `attention_impl=auto` then takes the blockwise core on that platform.
MISSING = {} if pallas_gpu.AVAILABLE else {"gpu": f"jax {jax.__version__} has no Pallas Triton backend"}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel family with its tile sizes: static (hashable) configuration of a fused call.

    `interpret` runs the kernels in the Pallas interpreter (CPU); `pltpu.InterpretParams` simulates a TPU.
    """

    platform: str
    block_q: int
    block_k: int
    interpret: bool | object = False

    @property
    def module(self) -> ModuleType:
        return KERNELS[self.platform]


def kernel_for(
    platform: str, head_dim: int, dtype: jnp.dtype, block_q: int = 0, block_k: int = 0, interpret=None
) -> Kernel:
    """The kernel family for `platform` (`tpu`, `gpu`; `cpu` interprets the TPU kernels), with the family's
    default tile sizes for zero `block_q`/`block_k`. Tile sizes must be powers of two, and unless
    interpreted at least the family's `MIN_BLOCK`."""
    family = "tpu" if platform == "cpu" else platform
    if family not in KERNELS:
        why = f" ({MISSING[family]})" if family in MISSING else ""
        raise ValueError(
            f"no Pallas attention kernels for platform {platform!r}{why}; they exist for {sorted(KERNELS)}"
        )
    if interpret is None:
        interpret = platform == "cpu"
    module = KERNELS[family]
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size and size & (size - 1):
            raise ValueError(f"attention {name}={size} must be a power of two (e.g. 128 or 512)")
        if size and size < module.MIN_BLOCK and not interpret:
            raise ValueError(
                f"attention {name}={size} is below the {family} kernels' smallest tile, {module.MIN_BLOCK}"
            )
    default_q, default_k = module.default_blocks(head_dim, dtype)
    return Kernel(family, block_q or default_q, block_k or default_k, interpret)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *, kernel: Kernel
) -> jax.Array:
    """Causal softmax attention `[B, T, Hq, d] -> [B, T, Hq, dv]`, as `reference.attention`."""
    return _attend(q[None], k[None], v, jnp.zeros((0,), jnp.float32), segment_ids, kernel)


def diff_attention(
    q1: jax.Array,
    q2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    v: jax.Array,
    lam: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    kernel: Kernel,
) -> jax.Array:
    """Differential attention `(A1 V) - lam (A2 V)`: `[B, T, H, d] ... -> [B, T, H, 2d]`, as the reference's."""
    weights = jnp.reshape(-lam, (1,)).astype(jnp.float32)
    return _attend(jnp.stack([q1, q2]), jnp.stack([k1, k2]), v, weights, segment_ids, kernel)


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, weights: jax.Array, segment_ids: jax.Array | None, kernel: Kernel
) -> jax.Array:
    """Branch-stacked `[n, B, T, H, d]` inputs in the sequence-major layout -> `[B, T, Hq, dv]`."""
    length = q.shape[2]
    # Short sequences get one tile (the whole padded sequence), never smaller than the compiled kernels allow.
    cap = _power_of_two_at_least(length)
    if not kernel.interpret:
        cap = max(cap, kernel.module.MIN_BLOCK)
    block_q, block_k = (min(block, cap) for block in (kernel.block_q, kernel.block_k))
    padded = _round_up(length, max(block_q, block_k))
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[1:3], jnp.int32)
    pad = padded - length

    def heads_major(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x, -3, -2)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])

    tiled = dataclasses.replace(kernel, block_q=block_q, block_k=block_k)
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    out = _fused(heads_major(q), heads_major(k), heads_major(v), segment_ids, weights, tiled)
    return jnp.swapaxes(out[:, :, :length], 1, 2)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def _options(kernel: Kernel) -> dict:
    return {"block_q": kernel.block_q, "block_k": kernel.block_k, "interpret": kernel.interpret}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, weights: jax.Array, kernel: Kernel
) -> jax.Array:
    return kernel.module.forward(q, k, v, segment_ids, weights, **_options(kernel))[0]


def _fused_forward(q, k, v, segment_ids, weights, kernel):
    out, others, lse = kernel.module.forward(q, k, v, segment_ids, weights, **_options(kernel))
    return out, (q, k, v, segment_ids, weights, out, others, lse)


def _fused_backward(kernel: Kernel, residuals: tuple, d_out: jax.Array) -> tuple:
    q, k, v, segment_ids, weights, out, others, lse = residuals
    # Row dots straight from the stored outputs (float32 accumulation, nothing output-sized materialised):
    # deltas[1:] = rowsum(o_b dO), and deltas[0] = rowsum(o_1 dO) = rowsum(out dO) - sum_b w_b rowsum(o_b dO).
    d_rest = jnp.einsum("nbhtd,bhtd->nbht", others, d_out, preferred_element_type=jnp.float32)
    d_all = jnp.einsum("bhtd,bhtd->bht", out, d_out, preferred_element_type=jnp.float32)
    deltas = jnp.concatenate([(d_all - jnp.einsum("n,nbht->bht", weights, d_rest))[None], d_rest])
    dq, dk, dv = kernel.module.backward(q, k, v, segment_ids, weights, lse, d_out, deltas, **_options(kernel))
    return dq, dk, dv, None, jnp.sum(deltas[1:], axis=(1, 2, 3)).astype(weights.dtype)


_fused.defvjp(_fused_forward, _fused_backward)
