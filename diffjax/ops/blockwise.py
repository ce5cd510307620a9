"""Blockwise (flash-style) causal attention in plain JAX: standard and differential, with custom VJPs.

Why: the dense reference materialises `[B, H, T, T]` logits, so its memory grows as T^2. Here keys are
visited block by block with an online softmax, so memory is linear in T: besides O(T) inputs, outputs and
residuals, the largest temporaries are a few `block_q x block_k` tiles per head.

Differential attention (SPEC section 5) runs TWO online softmaxes in ONE pass: each K/V block is read
once for both branches and `out = acc1 / l1 - lam * acc2 / l2`. The backward recomputes the
probabilities from the saved log-sum-exps, forms `dP = dO V^T` once for both branches and
`dV += (P1 - lam P2)^T dO` as one matmul. FLOPs per head in units of T^2 d (multiply-adds, halve for
causal): forward 6, backward 10. SPEC counts 14 for the backward of a parallel kernel that recomputes S
and dP in a separate dQ pass; a sequential XLA loop accumulates dQ in an O(T) float32 buffer instead.
(Two separate flash calls would cost 26, four calls with V split 36.)

Loops. Forward: a `scan` over query blocks i, each a `fori_loop` over key blocks j < `_num_key_blocks(i)`
(a data-dependent bound, so blocks strictly above the causal diagonal are never computed). Backward: a
`scan` over key blocks j carrying dQ, each a `fori_loop` over query blocks i >= `_first_query_block(j)`
accumulating dK_j and dV_j. Masks (causal, segments, padding) are applied inside the visited tiles only.

Residuals: the blocked inputs, the output, branches 2..n, and per-branch log-sum-exps. Branch 1 is
recovered as `o1 = out + lam o2` (SPEC): standard attention then saves nothing beyond its output, like
FlashAttention, and differential attention saves one extra `[B, T, H, 2d]` array, not two.

Standard attention is the same code with one branch: the core handles `n` branches combined as
`o_1 + sum_b w_b o_b` (differential: `n = 2`, `w = [-lam]`; standard: `n = 1`, `w = []`). Fully masked
rows (padding) keep the finite running max `EMPTY`, so they get zero probabilities, outputs and
gradients, never NaN.

Blocked layout (query blocks of `bq` rows, key blocks of `bk`, `G` kv heads, `R` query heads per kv
head, so GQA never repeats K/V): q `[nq, n, B, G, bq, R, d]`, k `[nk, n, B, G, bk, d]`, v
`[nk, B, G, bk, dv]`, segment ids `[nq or nk, B, bq or bk]` (0 = padding, also for the internal padded
tail when T is not a multiple of the block size). Accumulation is in float32; outputs in v's dtype.
"""

import jax
import jax.numpy as jnp
from jax import lax

from diffjax.ops.tiles import EMPTY, MASKED


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Causal softmax attention `[B, T, Hq, d] -> [B, T, Hq, dv]`, as `reference.attention`."""
    return _attend(q[None], k[None], v, jnp.zeros((0,), jnp.float32), segment_ids, block_q, block_k)


def diff_attention(
    q1: jax.Array,
    q2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    v: jax.Array,
    lam: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Differential attention `(A1 V) - lam (A2 V)`: `[B, T, H, d] ... -> [B, T, H, 2d]`, as the reference's.

    `v` is `[B, T, Hkv, 2d]`; `lam` is a scalar (its gradient comes back in its dtype).
    """
    weights = jnp.reshape(-lam, (1,)).astype(jnp.float32)
    return _attend(jnp.stack([q1, q2]), jnp.stack([k1, k2]), v, weights, segment_ids, block_q, block_k)


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weights: jax.Array,
    segment_ids: jax.Array | None,
    block_q: int,
    block_k: int,
) -> jax.Array:
    """Branch-stacked q `[n, B, T, Hq, d]`, k `[n, B, T, Hkv, d]`, v `[B, T, Hkv, dv]` -> `[B, T, Hq, dv]`."""
    n, batch, length, num_q, width = q.shape
    num_kv = k.shape[3]
    bq, bk = min(block_q, length), min(block_k, length)
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    grouped = q.reshape(n, batch, length, num_kv, num_q // num_kv, width)
    out = _blockwise(
        _blocks(jnp.swapaxes(grouped, 2, 3), bq, axis=3),
        _blocks(jnp.swapaxes(k, 2, 3), bk, axis=3),
        _blocks(jnp.swapaxes(v, 1, 2), bk, axis=2),
        weights,
        _blocks(segment_ids, bq, axis=1),
        _blocks(segment_ids, bk, axis=1),
    )
    out = _unblock(out, length, axis=2)  # [B, G, T, R, dv]
    return jnp.swapaxes(out, 1, 2).reshape(batch, length, num_q, -1)


def _blocks(x: jax.Array, block: int, axis: int) -> jax.Array:
    """Zero-pad the time `axis` to a multiple of `block`, split it, and move the block index to the front."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % block)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: jax.Array, length: int, axis: int) -> jax.Array:
    """Inverse of `_blocks`: merge the leading block index back into `axis` and drop the padding."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return lax.slice_in_dim(x, 0, length, axis=axis)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum` with float32 accumulation. XLA:CPU fails at run time on some bf16 x bf16 -> f32 dots
    ("Unsupported element type for DotThunk"), so there the operands are upcast (exactly) instead."""

    def upcast(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))

    def native(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    return lax.platform_dependent(a, b, cpu=upcast, default=native)


def _logits(q: jax.Array, k: jax.Array, q_seg: jax.Array, k_seg: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Scaled float32 logits `[n, B, G, bq, R, bk]` of tile (i, j); `MASKED` where causality or segments forbid."""
    bq, bk = q.shape[3], k.shape[3]
    logits = _dot("nbgqrd,nbgkd->nbgqrk", q, k) * q.shape[-1] ** -0.5
    causal = (i * bq + jnp.arange(bq))[:, None] >= (j * bk + jnp.arange(bk))[None, :]
    allowed = causal & (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg != 0)[:, :, None]
    return jnp.where(allowed[None, :, None, :, None, :], logits, MASKED)


def _num_key_blocks(i: jax.Array, bq: int, bk: int, num_k_blocks: int) -> jax.Array:
    """Key blocks query block `i` needs: those starting at or before its last row."""
    return jnp.minimum(((i + 1) * bq - 1) // bk + 1, num_k_blocks)


def _first_query_block(j: jax.Array, bq: int, bk: int) -> jax.Array:
    """First query block that sees key block `j` (the inverse of `_num_key_blocks`)."""
    return (j * bk) // bq


def _combine(weights: jax.Array, first: jax.Array, others: jax.Array) -> jax.Array:
    """`first + sum_b weights[b] * others[b]`, unrolled over the static branch count (XLA:CPU makes a
    `tensordot` over the branch axis a degenerate dot, ten times slower than these few multiply-adds)."""
    for b in range(weights.shape[0]):
        first = first + weights[b] * others[b]
    return first


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, weights: jax.Array, q_seg: jax.Array, k_seg: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Combined output `[nq, B, G, bq, R, dv]`, outputs of branches 2..n, and float32 log-sum-exps `[nq, n, ...]`."""
    _, n, batch, num_kv, bq, rep, _ = q.shape
    num_k_blocks, bk = k.shape[0], k.shape[4]
    rows = (n, batch, num_kv, bq, rep)

    def query_block(_, xs):
        i, q_i, seg_i = xs

        def key_block(j, carry):
            row_max, row_sum, acc = carry
            logits = _logits(q_i, k[j], seg_i, k_seg[j], i, j)
            new_max = jnp.maximum(row_max, logits.max(axis=-1))
            rescale = jnp.exp(row_max - new_max)
            probs = jnp.exp(logits - new_max[..., None])
            pv = _dot("nbgqrk,bgkd->nbgqrd", probs.astype(v.dtype), v[j])
            return new_max, rescale * row_sum + probs.sum(axis=-1), rescale[..., None] * acc + pv

        init = (
            jnp.full(rows, EMPTY, jnp.float32),
            jnp.zeros(rows, jnp.float32),
            jnp.zeros((*rows, v.shape[-1]), jnp.float32),
        )
        row_max, row_sum, acc = lax.fori_loop(0, _num_key_blocks(i, bq, bk, num_k_blocks), key_block, init)
        row_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # empty rows: acc == 0 and lse == EMPTY
        branches = acc / row_sum[..., None]
        out = _combine(weights, branches[0], branches[1:]).astype(v.dtype)
        return None, (out, branches[1:].astype(v.dtype), row_max + jnp.log(row_sum))

    _, outputs = lax.scan(query_block, None, (jnp.arange(q.shape[0]), q, q_seg))
    return outputs


@jax.custom_vjp
def _blockwise(
    q: jax.Array, k: jax.Array, v: jax.Array, weights: jax.Array, q_seg: jax.Array, k_seg: jax.Array
) -> jax.Array:
    """Multi-branch causal attention on the blocked layout; see the module docstring."""
    return _forward(q, k, v, weights, q_seg, k_seg)[0]


def _blockwise_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, weights: jax.Array, q_seg: jax.Array, k_seg: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Residuals: inputs, the output, branches 2..n (branch 1 is recovered as `out - sum w_b o_b`), lse."""
    out, rest, lse = _forward(q, k, v, weights, q_seg, k_seg)
    return out, (q, k, v, weights, q_seg, k_seg, out, rest, lse)


def _blockwise_bwd(residuals: tuple[jax.Array, ...], d_out: jax.Array) -> tuple[jax.Array | None, ...]:
    """SPEC section 5: one pass over key blocks j, each visiting only the query blocks i that see it."""
    q, k, v, weights, q_seg, k_seg, out, rest, lse = residuals
    num_q_blocks, _, _, _, bq, _, _ = q.shape
    bk = k.shape[4]
    scale = q.shape[-1] ** -0.5
    rest, d_out32 = rest.astype(jnp.float32), d_out.astype(jnp.float32)
    first = _combine(-weights, out.astype(jnp.float32), jnp.moveaxis(rest, 1, 0))  # o1 = out + lam o2
    d_rest = jnp.sum(rest * d_out32[:, None], axis=-1)  # D_b = rowsum(o_b * dO), [nq, n - 1, B, G, bq, R]
    delta = jnp.concatenate([jnp.sum(first * d_out32, axis=-1)[:, None], d_rest], axis=1)
    d_weights = jnp.sum(d_rest, axis=(0, 2, 3, 4, 5))
    coef = jnp.concatenate([jnp.ones((1,), jnp.float32), weights]).reshape(-1, 1, 1, 1, 1, 1)

    def key_block(d_q, xs):
        j, k_j, v_j, seg_j = xs

        def query_block(i, carry):
            d_k, d_v, d_q = carry
            logits = _logits(q[i], k_j, q_seg[i], seg_j, i, j)
            probs = jnp.exp(logits - lse[i][..., None])
            d_probs = _dot("bgqrd,bgkd->bgqrk", d_out[i], v_j)
            d_logits = (coef * scale * probs * (d_probs - delta[i][..., None])).astype(q.dtype)
            mixed = _combine(weights, probs[0], probs[1:]).astype(d_out.dtype)  # P1 - lam P2
            d_v += _dot("bgqrk,bgqrd->bgkd", mixed, d_out[i])
            d_k += _dot("nbgqrk,nbgqrd->nbgkd", d_logits, q[i])
            d_q_i = _dot("nbgqrk,nbgkd->nbgqrd", d_logits, k_j)
            return d_k, d_v, d_q.at[i].add(d_q_i)

        init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32), d_q)
        d_k, d_v, d_q = lax.fori_loop(_first_query_block(j, bq, bk), num_q_blocks, query_block, init)
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    xs = (jnp.arange(k.shape[0]), k, v, k_seg)
    d_q, (d_k, d_v) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), xs)
    return d_q.astype(q.dtype), d_k, d_v, d_weights, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
