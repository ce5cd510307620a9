"""Fused multi-branch flash attention for TPU (Pallas, Mosaic): forward, dK/dV and dQ kernels.

The kernels implement the contract of `diffjax.ops.pallas` (heads-major layout, branches stacked, T padded
to the block sizes, segment ids always given, `weights` combining the branches). Differential attention is
the `n = 2` case: both softmaxes run in one pass, each K/V tile is DMA'd into VMEM once for both, the
backward forms `dP = dO V^T` once and `dV` with one matmul on `P1 - lambda P2` (SPEC section 5: 6 + 14
units of T^2 d per head, halved by causality).

Grids (the last axes are reductions, "arbitrary"; the others "parallel", so megacore chips split them):
- forward and dQ: `(B, Hq, nq, nk)`, accumulating over key blocks in VMEM scratch;
- dK/dV: `(B, Hkv, nk, R, nq)`, accumulating over the R query heads of a GQA group and the query blocks,
  so a shared K/V head gets its gradient without K/V ever being repeated.
Blocks above the causal diagonal are skipped twice: their compute by `pl.when`, their DMA by index maps
that keep pointing at the block needed next (an unchanged block index is not fetched again).

Row statistics: the forward's running max and sum live in VMEM lane-broadcast as `(rows, 128)` float32,
the layout Mosaic tiles natively. In HBM, log-sum-exps and deltas are `[n, B, Hq, 1, T]`, a `(1, bq)` row
per query block turned into a column inside the kernel (a lane-broadcast HBM copy would cost 128x their
size: 641 instead of 385 MiB of temporaries at T=4096, d=128). Segment ids reach the kernel as
`[B, T, 128]` (query side, a column per row) and `[B, 8, T]` (key side, a row per column).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from diffjax.ops.tiles import EMPTY, MASKED, branch_coefficients

LANES, SUBLANES = 128, 8
MIN_BLOCK = LANES  # key tiles are lane-dimension blocks (a smaller one only as a whole padded sequence)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b

Interpret = bool | pltpu.InterpretParams


def default_blocks(head_dim: int, dtype: jnp.dtype) -> tuple[int, int]:
    """Forward `(block_q, block_k)`: 512 x 512 tiles keep the MXU (128 or 256 wide) busy and the grid short
    on v4, v5e, v5p and v6e, and fit their scoped VMEM at head widths up to 256 (checked by compiling)."""
    del head_dim, dtype
    return 512, 512


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """Matmul with float32 accumulation (bfloat16 operands stay bfloat16 on the MXU)."""
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _needed(i: jax.Array, j: jax.Array, bq: int, bk: int) -> jax.Array:
    """Whether key block j holds a key at or before the last query of block i (causality)."""
    return j * bk <= i * bq + bq - 1


def _first_query_block(j: jax.Array, bq: int, bk: int) -> jax.Array:
    return lax.div(j * bk, bq)


def _allowed(i: jax.Array, j: jax.Array, q_seg: jax.Array, k_seg: jax.Array, bq: int, bk: int) -> jax.Array:
    """`(bq, bk)` mask of tile (i, j): causal, same segment, and never from a padding query (segment 0)."""
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg, k_seg = q_seg[:, :1], k_seg[:1, :]
    return (rows >= cols) & (q_seg == k_seg) & (q_seg != 0)


def _logits(q: jax.Array, k: jax.Array, allowed: jax.Array, scale: float) -> jax.Array:
    return jnp.where(allowed, _dot(q, k, _NT) * scale, MASKED)


def _segment_layouts(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch, length = segment_ids.shape
    q_seg = lax.broadcast_in_dim(segment_ids, (batch, length, LANES), (0, 1))
    k_seg = lax.broadcast_in_dim(segment_ids, (batch, SUBLANES, length), (0, 2))
    return q_seg, k_seg


def _column(row_ref, b: int) -> jax.Array:
    """Branch b's `(1, bq)` block of a row statistic (lse, delta), as the `(bq, 1)` column tiles broadcast with."""
    return jnp.expand_dims(row_ref[b, 0], -1)


def _forward_kernel(coef_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, *refs, n, bq, bk, scale):
    out_ref, *others_ref, lse_ref, max_ref, sum_ref, acc_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, EMPTY, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_needed(i, j, bq, bk))
    def _accumulate():
        allowed = _allowed(i, j, q_seg_ref[...], k_seg_ref[...], bq, bk)
        v = v_ref[...]
        for b in range(n):
            logits = _logits(q_ref[b], k_ref[b], allowed, scale)
            old_max = max_ref[b]
            new_max = jnp.maximum(old_max, logits.max(axis=1, keepdims=True))
            probs = jnp.exp(logits - new_max[:, :1])
            rescale = jnp.exp(old_max - new_max)
            max_ref[b] = new_max
            sum_ref[b] = rescale * sum_ref[b] + probs.sum(axis=1, keepdims=True)
            acc_ref[b] = rescale[:, :1] * acc_ref[b] + _dot(probs.astype(v.dtype), v, _NN)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out = jnp.zeros(acc_ref.shape[1:], jnp.float32)
        for b in range(n):
            total = sum_ref[b]
            total = jnp.where(total > 0, total, 1.0)  # empty rows: acc == 0 and lse stays near EMPTY
            branch = acc_ref[b] / total[:, :1]
            out += coef_ref[b] * branch
            if b:
                others_ref[0][b - 1] = branch.astype(others_ref[0].dtype)
            lse_ref[b] = jnp.transpose(max_ref[b] + jnp.log(total))[:1]  # lane-broadcast column -> one row
        out_ref[...] = out.astype(out_ref.dtype)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    weights: jax.Array,
    *,
    block_q: int,
    block_k: int,
    interpret: Interpret = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(out [B, Hq, T, dv], others [n-1, B, Hq, T, dv], lse [n, B, Hq, T])`; see `diffjax.ops.pallas`."""
    n, batch, num_q, length, width = q.shape
    num_kv, dv = k.shape[2], v.shape[-1]
    rep, bq, bk = num_q // num_kv, block_q, block_k

    def kv_block(b, h, i, j):  # a skipped block fetches the first block of the next query row instead
        return b, lax.div(h, rep), lax.select(_needed(i, j, bq, bk), j, 0)

    def kv_index(b, h, i, j):
        b, g, jj = kv_block(b, h, i, j)
        return 0, b, g, jj, 0

    def v_index(b, h, i, j):
        b, g, jj = kv_block(b, h, i, j)
        return b, g, jj, 0

    def k_seg_index(b, h, i, j):
        return b, 0, kv_block(b, h, i, j)[2]

    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((n, None, None, bq, width), lambda b, h, i, j: (0, b, h, i, 0)),
        pl.BlockSpec((n, None, None, bk, width), kv_index),
        pl.BlockSpec((None, None, bk, dv), v_index),
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), k_seg_index),
    ]
    out_shape = [jax.ShapeDtypeStruct((batch, num_q, length, dv), v.dtype)]
    out_specs = [pl.BlockSpec((None, None, bq, dv), lambda b, h, i, j: (b, h, i, 0))]
    if n > 1:
        out_shape.append(jax.ShapeDtypeStruct((n - 1, batch, num_q, length, dv), v.dtype))
        out_specs.append(pl.BlockSpec((n - 1, None, None, bq, dv), lambda b, h, i, j: (0, b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((n, batch, num_q, 1, length), jnp.float32))
    out_specs.append(pl.BlockSpec((n, None, None, 1, bq), lambda b, h, i, j: (0, b, h, 0, i)))
    kernel = functools.partial(_forward_kernel, n=n, bq=bq, bk=bk, scale=width**-0.5)
    outputs = pl.pallas_call(
        kernel,
        grid=(batch, num_q, length // bq, length // bk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((n, bq, LANES), jnp.float32),
            pltpu.VMEM((n, bq, LANES), jnp.float32),
            pltpu.VMEM((n, bq, dv), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, v, n, "forward"),
        interpret=interpret,
        name="diff_flash_forward",
    )(branch_coefficients(weights), q, k, v, *_segment_layouts(segment_ids))
    out, *others, lse = outputs
    others = others[0] if others else jnp.zeros((0, batch, num_q, length, dv), v.dtype)
    return out, others, lse[:, :, :, 0]


def _dkv_kernel(*refs, n, bq, bk, scale):
    coef_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref, *outputs = refs
    dk_ref, dv_ref, dk_acc, dv_acc = outputs
    j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(_needed(i, j, bq, bk))
    def _accumulate():
        allowed = _allowed(i, j, q_seg_ref[...], k_seg_ref[...], bq, bk)
        d_out = d_out_ref[...]
        d_probs = _dot(d_out, v_ref[...], _NT)  # dO V^T, once for every branch
        mixed = jnp.zeros((bq, bk), jnp.float32)
        for b in range(n):
            q = q_ref[b]
            probs = jnp.exp(_logits(q, k_ref[b], allowed, scale) - _column(lse_ref, b))
            mixed += coef_ref[b] * probs
            d_logits = (coef_ref[b] * scale) * probs * (d_probs - _column(delta_ref, b))
            dk_acc[b] += _dot(d_logits.astype(q.dtype), q, _TN)
        dv_acc[...] += _dot(mixed.astype(d_out.dtype), d_out, _TN)  # (P1 - lambda P2)^T dO

    @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, n, bq, bk, scale):
    coef_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref, dq_ref, dq_acc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(_needed(i, j, bq, bk))
    def _accumulate():
        allowed = _allowed(i, j, q_seg_ref[...], k_seg_ref[...], bq, bk)
        d_probs = _dot(d_out_ref[...], v_ref[...], _NT)
        for b in range(n):
            k = k_ref[b]
            probs = jnp.exp(_logits(q_ref[b], k, allowed, scale) - _column(lse_ref, b))
            d_logits = (coef_ref[b] * scale) * probs * (d_probs - _column(delta_ref, b))
            dq_acc[b] += _dot(d_logits.astype(k.dtype), k, _NN)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    weights: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    deltas: jax.Array,
    *,
    block_q: int,
    block_k: int,
    interpret: Interpret = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(dq, dk, dv)` from the forward's log-sum-exps and `deltas[b] = rowsum(o_b * dO)`; see `diffjax.ops.pallas`."""
    n, batch, num_q, length, width = q.shape
    num_kv, dv = k.shape[2], v.shape[-1]
    rep, bq, bk = num_q // num_kv, block_q, block_k
    scale = width**-0.5
    rows = (x[:, :, :, None] for x in (lse, deltas))  # [n, B, Hq, 1, T]: a (1, bq) block per query block
    inputs = (branch_coefficients(weights), q, k, v, d_out, *rows, *_segment_layouts(segment_ids))
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)

    # dK, dV: grid (B, Hkv, nk, R, nq); a skipped query block fetches the first one key block j needs.
    def q_block(b, g, j, r, i):
        return b, g * rep + r, lax.select(_needed(i, j, bq, bk), i, _first_query_block(j, bq, bk))

    def q_index(*idx):
        b, h, ii = q_block(*idx)
        return 0, b, h, ii, 0

    def row_index(*idx):
        b, h, ii = q_block(*idx)
        return b, h, ii, 0

    def q_seg_index(*idx):
        b, _, ii = q_block(*idx)
        return b, ii, 0

    def stat_index(*idx):
        b, h, ii = q_block(*idx)
        return 0, b, h, 0, ii

    dkv_specs = [
        smem,
        pl.BlockSpec((n, None, None, bq, width), q_index),
        pl.BlockSpec((n, None, None, bk, width), lambda b, g, j, r, i: (0, b, g, j, 0)),
        pl.BlockSpec((None, None, bk, dv), lambda b, g, j, r, i: (b, g, j, 0)),
        pl.BlockSpec((None, None, bq, dv), row_index),
        pl.BlockSpec((n, None, None, 1, bq), stat_index),
        pl.BlockSpec((n, None, None, 1, bq), stat_index),
        pl.BlockSpec((None, bq, LANES), q_seg_index),
        pl.BlockSpec((None, SUBLANES, bk), lambda b, g, j, r, i: (b, 0, j)),
    ]
    options = {"n": n, "bq": bq, "bk": bk, "scale": scale}
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, **options),
        grid=(batch, num_kv, length // bk, rep, length // bq),
        in_specs=dkv_specs,
        out_specs=[
            pl.BlockSpec((n, None, None, bk, width), lambda b, g, j, r, i: (0, b, g, j, 0)),
            pl.BlockSpec((None, None, bk, dv), lambda b, g, j, r, i: (b, g, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((n, bk, width), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=_cost(q, k, v, n, "dkv"),
        interpret=interpret,
        name="diff_flash_dkv",
    )(*inputs)

    # dQ: grid (B, Hq, nq, nk) like the forward.
    def kv_block(b, h, i, j):
        return b, lax.div(h, rep), lax.select(_needed(i, j, bq, bk), j, 0)

    def kv_index(*idx):
        b, g, jj = kv_block(*idx)
        return 0, b, g, jj, 0

    def v_index(*idx):
        b, g, jj = kv_block(*idx)
        return b, g, jj, 0

    def k_seg_index(*idx):
        b, _, jj = kv_block(*idx)
        return b, 0, jj

    def rows_index(b, h, i, j):
        return 0, b, h, i, 0

    dq_specs = [
        smem,
        pl.BlockSpec((n, None, None, bq, width), rows_index),
        pl.BlockSpec((n, None, None, bk, width), kv_index),
        pl.BlockSpec((None, None, bk, dv), v_index),
        pl.BlockSpec((None, None, bq, dv), lambda b, h, i, j: (b, h, i, 0)),
        pl.BlockSpec((n, None, None, 1, bq), lambda b, h, i, j: (0, b, h, 0, i)),
        pl.BlockSpec((n, None, None, 1, bq), lambda b, h, i, j: (0, b, h, 0, i)),
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), k_seg_index),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **options),
        grid=(batch, num_q, length // bq, length // bk),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((n, None, None, bq, width), rows_index),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((n, bq, width), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, v, n, "dq"),
        interpret=interpret,
        name="diff_flash_dq",
    )(*inputs)
    return dq, dk, dv_


def _cost(q: jax.Array, k: jax.Array, v: jax.Array, n: int, kernel: str) -> pl.CostEstimate:
    """Causal FLOPs and bytes of one kernel (SPEC section 5), so XLA can schedule around it."""
    _, batch, num_q, length, width = q.shape
    pairs = batch * num_q * length * (length + 1) // 2
    # Matmul widths per (query, key) pair: logits of every branch, then P V / dO V^T / dV / dK / dQ.
    widths = {
        "forward": n * (width + v.shape[-1]),
        "dkv": 2 * n * width + 2 * v.shape[-1],
        "dq": 2 * n * width + v.shape[-1],
    }
    moved = sum(x.size * x.dtype.itemsize for x in (q, k, v))
    return pl.CostEstimate(flops=2 * pairs * widths[kernel], transcendentals=n * pairs, bytes_accessed=moved)
