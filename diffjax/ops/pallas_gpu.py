"""Fused differential flash attention for GPUs: Pallas kernels on the Triton backend, forward and backward.

Why: differential attention is two softmaxes over the same V. Two flash-attention calls read every K/V
tile twice and run two backward passes; here one pass serves both branches (SPEC section 5). The
forward keeps two online softmaxes and reads each V tile once; the backward forms `dP = dO V^T` once for
all branches and `dV += (P_1 + sum_b w_b P_b)^T dO` as one matmul. FLOPs per head in units of T^2 d
(halved by causality, which the loop bounds exploit): forward 6 (two `QK^T` of width d, two `PV` of
width 2d), backward 14 (dK/dV kernel: two `S`, `dP`, `dV`, two `dK` = 8; dQ kernel: two `S`, `dP`, two
`dQ` = 6), 20 in all against 26 for two flash calls.

Structure (FlashAttention-2):
- forward: grid (query blocks, B, Hq); each program keeps its query tiles resident and loops over key
  blocks up to the causal diagonal only (blocks above it are never visited).
- dK/dV: grid (key blocks, B, Hkv); each program loops over the `R = Hq / Hkv` query heads of its group
  and over the query blocks from the diagonal on, so GQA accumulates the shared kv head's gradient in
  registers: K/V are indexed, never repeated, and no atomics are needed.
- dQ: grid like the forward, recomputing `S` and `dP` (the 6 units that avoid dQ atomics).

The `n` branches are combined as `out = o_1 + sum_b weights[b - 1] o_b` (differential: `n = 2`,
`weights = [-lambda]`; standard attention: `n = 1`), as in `blockwise.py`, whose one-pass XLA algorithm
this is. Masks (causal, same segment, padding) are applied inside the visited tiles. Fully masked rows
keep the finite running max `EMPTY`, so they get zero outputs and gradients, never NaN.

Layout (the shared wrapper's contract): heads-major, branches stacked, T a multiple of both block
sizes. Triton needs power-of-two tiles with matmul dims >= 16, so head dims are zero-padded here to
the next power of two >= 16 (zero q/k columns leave the logits unchanged; the scale stays `d ** -0.5`)
and sliced back. Softmax and accumulation are float32; probabilities meet V (and dS meets Q/K) in the
input dtype, so bfloat16 inputs use bfloat16 tensor-core operands with float32 accumulators.
`interpret=True` runs the same kernels on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # a jax whose Pallas has lost its Triton backend (deprecated in 0.11): see docs/accelerator.md
    plgpu = None

from diffjax.ops.tiles import EMPTY, MASKED, branch_coefficients

# Devices with Hopper-class register files and shared memory (228 KB per SM).
_HOPPER_CLASS = ("H100", "H200", "H800", "H20", "GH200")
MIN_BLOCK = 16  # Triton's matmuls need every tile dimension >= 16
AVAILABLE = plgpu is not None


def default_blocks(head_dim: int, dtype: jnp.dtype) -> tuple[int, int]:
    """Forward `(block_q, block_k)` for the local GPU generation, sized for the differential case.

    Each program holds `n` float32 accumulators of `block_q x 2d` plus its query tiles in registers;
    at `d >= 128` (values 256 wide after padding) larger query blocks spill. Hopper class affords 128
    query rows at `d <= 64`; elsewhere (A100 and smaller parts, 164 KB or less of shared memory for the
    two key tiles and the value tile per pipeline stage) key blocks shrink at `d >= 128`. Float32 inputs
    double the tile bytes, so they get the next smaller key block.
    """
    kind = jax.devices()[0].device_kind
    wide = _padded(head_dim) >= 128
    if any(name in kind for name in _HOPPER_CLASS):
        block_q, block_k = (64, 64) if wide else (128, 64)
    else:
        block_q, block_k = (64, 32) if wide else (64, 64)
    if jnp.dtype(dtype).itemsize > 2:
        block_k = max(block_k // 2, 16)
    return block_q, block_k


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    weights: jax.Array,
    *,
    block_q: int,
    block_k: int,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(out [B, Hq, T, dv], others [n-1, B, Hq, T, dv], lse [n, B, Hq, T])` of the contract above.

    `q [n, B, Hq, T, d]`, `k [n, B, Hkv, T, d]`, `v [B, Hkv, T, dv]`, `segment_ids [B, T]` (0 = padding),
    `weights [n - 1]`. `lse` is the float32 log-sum-exp of the scaled logits (`EMPTY` for empty rows).
    """
    n, batch, num_q, length, width = q.shape
    num_kv, dv = k.shape[2], v.shape[-1]
    rep = num_q // num_kv
    qp, kp, vp = _pad_head(q), _pad_head(k), _pad_head(v)
    dp, dvp = qp.shape[-1], vp.shape[-1]
    coef = branch_coefficients(weights)

    out_shape = [jax.ShapeDtypeStruct((batch, num_q, length, dvp), v.dtype)]
    out_specs = [pl.BlockSpec((None, None, block_q, dvp), lambda i, b, h: (b, h, i, 0))]
    if n > 1:
        out_shape.append(jax.ShapeDtypeStruct((n - 1, batch, num_q, length, dvp), v.dtype))
        out_specs.append(pl.BlockSpec((n - 1, None, None, block_q, dvp), lambda i, b, h: (0, b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((n, batch, num_q, length), jnp.float32))
    out_specs.append(_row_spec(n, block_q))

    results = pl.pallas_call(
        functools.partial(_forward_kernel, scale=width**-0.5, block_k=block_k),
        out_shape=out_shape,
        grid=(length // block_q, batch, num_q),
        in_specs=_query_block_specs(n, rep, length, block_q, dp, dvp),
        out_specs=out_specs,
        compiler_params=_compiler_params(block_q, block_k, dvp),
        interpret=interpret,
        name="diff_flash_forward",
    )(coef, segment_ids.astype(jnp.int32), qp, kp, vp)
    out, lse = results[0], results[-1]
    others = results[1][..., :dv] if n > 1 else jnp.zeros((0, batch, num_q, length, dv), v.dtype)
    return out[..., :dv], others, lse


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(dq, dk, dv)` in the layouts and dtypes of `(q, k, v)`; `deltas[b] = rowsum(o_b * d_out)`."""
    n, batch, num_q, length, width = q.shape
    num_kv = k.shape[2]
    rep = num_q // num_kv
    qp, kp, vp, dop = _pad_head(q), _pad_head(k), _pad_head(v), _pad_head(d_out)
    dp, dvp = qp.shape[-1], vp.shape[-1]
    operands = (branch_coefficients(weights), segment_ids.astype(jnp.int32), qp, kp, vp, dop, lse, deltas)
    params = _compiler_params(block_q, block_k, dvp)
    scale = width**-0.5

    d_k, d_v = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=block_q),
        out_shape=[
            jax.ShapeDtypeStruct(kp.shape, k.dtype),
            jax.ShapeDtypeStruct(vp.shape, v.dtype),
        ],
        grid=(length // block_k, batch, num_kv),
        in_specs=[
            pl.BlockSpec((n,), lambda j, b, g: (0,)),
            pl.BlockSpec((None, length), lambda j, b, g: (b, 0)),
            pl.BlockSpec((n, None, rep, length, dp), lambda j, b, g: (0, b, g, 0, 0)),
            pl.BlockSpec((n, None, None, block_k, dp), lambda j, b, g: (0, b, g, j, 0)),
            pl.BlockSpec((None, None, block_k, dvp), lambda j, b, g: (b, g, j, 0)),
            pl.BlockSpec((None, rep, length, dvp), lambda j, b, g: (b, g, 0, 0)),
            pl.BlockSpec((n, None, rep, length), lambda j, b, g: (0, b, g, 0)),
            pl.BlockSpec((n, None, rep, length), lambda j, b, g: (0, b, g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((n, None, None, block_k, dp), lambda j, b, g: (0, b, g, j, 0)),
            pl.BlockSpec((None, None, block_k, dvp), lambda j, b, g: (b, g, j, 0)),
        ],
        compiler_params=params,
        interpret=interpret,
        name="diff_flash_backward_dkdv",
    )(*operands)

    d_q = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        grid=(length // block_q, batch, num_q),
        in_specs=[
            *_query_block_specs(n, rep, length, block_q, dp, dvp),
            pl.BlockSpec((None, None, block_q, dvp), lambda i, b, h: (b, h, i, 0)),
            _row_spec(n, block_q),
            _row_spec(n, block_q),
        ],
        out_specs=pl.BlockSpec((n, None, None, block_q, dp), lambda i, b, h: (0, b, h, i, 0)),
        compiler_params=params,
        interpret=interpret,
        name="diff_flash_backward_dq",
    )(*operands)
    return d_q[..., : q.shape[-1]], d_k[..., : k.shape[-1]], d_v[..., : v.shape[-1]]


def _query_block_specs(n: int, rep: int, length: int, block_q: int, dp: int, dvp: int) -> list[pl.BlockSpec]:
    """Specs of `(coef, segment_ids, q, k, v)` on the grid (query blocks, B, Hq): the program's query
    tiles, and the whole K/V of its kv head `h // rep` (read tile by tile in the kernel)."""
    return [
        pl.BlockSpec((n,), lambda i, b, h: (0,)),
        pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
        pl.BlockSpec((n, None, None, block_q, dp), lambda i, b, h: (0, b, h, i, 0)),
        pl.BlockSpec((n, None, None, length, dp), lambda i, b, h: (0, b, lax.div(h, rep), 0, 0)),
        pl.BlockSpec((None, None, length, dvp), lambda i, b, h: (b, lax.div(h, rep), 0, 0)),
    ]


def _row_spec(n: int, block_q: int) -> pl.BlockSpec:
    """Spec of a per-branch row statistic `[n, B, Hq, T]` (lse, deltas) on the grid (query blocks, B, Hq)."""
    return pl.BlockSpec((n, None, None, block_q), lambda i, b, h: (0, b, h, i))


def _padded(width: int) -> int:
    """The next power of two >= max(width, 16): Triton's tile and matmul constraints."""
    return max(16, 1 << (width - 1).bit_length())


def _pad_head(x: jax.Array) -> jax.Array:
    """Zero-pad the last (head) axis to `_padded` width; a no-op when it already is."""
    extra = _padded(x.shape[-1]) - x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def _compiler_params(block_q: int, block_k: int, value_width: int) -> "plgpu.CompilerParams":
    """Triton launch parameters: 8 warps once a tile or the value accumulator is large, else 4."""
    large = max(block_q, block_k) >= 128 or value_width >= 256
    return plgpu.CompilerParams(num_warps=8 if large else 4, num_stages=2)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting axis `contract[0]` of `a` with `contract[1]` of `b`, float32 accumulation."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _allowed(q_seg: jax.Array, k_seg: jax.Array, q_start: jax.Array, k_start: jax.Array) -> jax.Array:
    """Boolean tile: causal, same segment, and never from a padding query (segment 0)."""
    rows = q_start + lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], k_seg.shape[0]), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], k_seg.shape[0]), 1)
    same = q_seg[:, None] == k_seg[None, :]
    return (rows >= cols) & same & (q_seg != 0)[:, None]


def _logits(q: jax.Array, k: jax.Array, allowed: jax.Array, scale: float) -> jax.Array:
    """Scaled float32 logits `q k^T * scale` of a tile, `MASKED` where not allowed."""
    return jnp.where(allowed, _dot(q, k, (1, 1)) * scale, MASKED)


def _forward_kernel(coef_ref, seg_ref, q_ref, k_ref, v_ref, out_ref, *rest_refs, scale: float, block_k: int):
    """One query block of one head: online softmax of every branch over the key blocks it sees."""
    *others_ref, lse_ref = rest_refs
    n, block_q = q_ref.shape[0], q_ref.shape[1]
    i = pl.program_id(0)
    coefs = _load_coefficients(coef_ref)
    queries = [q_ref[b] for b in range(n)]
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]

    def key_block(j, carry):
        keys = pl.ds(j * block_k, block_k)
        allowed = _allowed(q_seg, seg_ref[keys], i * block_q, j * block_k)
        v = v_ref[keys, :]
        updated = []
        for b, (row_max, row_sum, acc) in enumerate(carry):
            logits = _logits(queries[b], k_ref[b, keys, :], allowed, scale)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
            rescale = jnp.exp(row_max - new_max)
            probs = jnp.exp(logits - new_max[:, None])
            pv = _dot(probs.astype(v.dtype), v, (1, 0))
            updated.append((new_max, rescale * row_sum + jnp.sum(probs, axis=1), rescale[:, None] * acc + pv))
        return tuple(updated)

    init = (
        jnp.full((block_q,), EMPTY, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
    )
    final = lax.fori_loop(0, _num_key_blocks(i, block_q, block_k), key_block, (init,) * n)
    out = None
    for b, (row_max, row_sum, acc) in enumerate(final):
        row_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # empty rows: acc == 0 and lse == EMPTY
        branch = acc / row_sum[:, None]
        lse_ref[b] = row_max + jnp.log(row_sum)
        if b == 0:
            out = branch
        else:
            others_ref[0][b - 1] = branch.astype(others_ref[0].dtype)
            out = out + coefs[b] * branch
    out_ref[...] = out.astype(out_ref.dtype)


def _tile_gradients(
    coefs, queries, keys, v, d_out, lse_rows, delta_rows, allowed, scale: float
) -> tuple[list[jax.Array], list[jax.Array]]:
    """SPEC 5 on one tile: per-branch `dS_b` (in q's dtype) and probabilities `P_b` (float32)."""
    d_probs = _dot(d_out, v, (1, 1))  # dP = dO V^T, once for all branches
    d_logits, probs = [], []
    for q, k, coef, lse, delta in zip(queries, keys, coefs, lse_rows, delta_rows, strict=True):
        probs.append(jnp.exp(_logits(q, k, allowed, scale) - lse[:, None]))
        d_logits.append((coef * scale * probs[-1] * (d_probs - delta[:, None])).astype(q.dtype))
    return d_logits, probs


def _dkdv_kernel(
    coef_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, block_q: int
):
    """One key block of one kv head: dK_b and dV over the group's query heads and the query blocks from the diagonal."""
    n, block_k = k_ref.shape[0], k_ref.shape[1]
    rep, length = q_ref.shape[1], q_ref.shape[2]
    j = pl.program_id(0)
    coefs = _load_coefficients(coef_ref)
    keys = [k_ref[b] for b in range(n)]
    v = v_ref[...]
    k_seg = seg_ref[pl.ds(j * block_k, block_k)]

    def query_block(r, i, carry):
        d_keys, d_v = carry
        rows = pl.ds(i * block_q, block_q)
        queries = [q_ref[b, r, rows, :] for b in range(n)]
        d_out = do_ref[r, rows, :]
        allowed = _allowed(seg_ref[rows], k_seg, i * block_q, j * block_k)
        lse_rows = [lse_ref[b, r, rows] for b in range(n)]
        delta_rows = [delta_ref[b, r, rows] for b in range(n)]
        d_logits, probs = _tile_gradients(coefs, queries, keys, v, d_out, lse_rows, delta_rows, allowed, scale)
        d_keys = tuple(dk + _dot(ds, q, (0, 0)) for dk, ds, q in zip(d_keys, d_logits, queries, strict=True))
        mixed = probs[0]  # P_1 + sum_b coef_b P_b: dV in one matmul
        for coef, p in zip(coefs[1:], probs[1:], strict=True):
            mixed = mixed + coef * p
        return d_keys, d_v + _dot(mixed.astype(d_out.dtype), d_out, (0, 0))

    def head(r, carry):
        first = lax.div(j * block_k, block_q)
        return lax.fori_loop(first, length // block_q, functools.partial(query_block, r), carry)

    init = (
        tuple(jnp.zeros(keys[0].shape, jnp.float32) for _ in range(n)),
        jnp.zeros(v.shape, jnp.float32),
    )
    d_keys, d_v = lax.fori_loop(0, rep, head, init)
    for b in range(n):
        dk_ref[b] = d_keys[b].astype(dk_ref.dtype)
    dv_ref[...] = d_v.astype(dv_ref.dtype)


def _dq_kernel(
    coef_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, block_k: int
):
    """One query block of one head: dQ_b over the key blocks up to the diagonal."""
    n, block_q = q_ref.shape[0], q_ref.shape[1]
    i = pl.program_id(0)
    coefs = _load_coefficients(coef_ref)
    queries = [q_ref[b] for b in range(n)]
    d_out = do_ref[...]
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]
    lse_rows = [lse_ref[b] for b in range(n)]
    delta_rows = [delta_ref[b] for b in range(n)]

    def key_block(j, d_queries):
        cols = pl.ds(j * block_k, block_k)
        keys = [k_ref[b, cols, :] for b in range(n)]
        allowed = _allowed(q_seg, seg_ref[cols], i * block_q, j * block_k)
        d_logits, _ = _tile_gradients(coefs, queries, keys, v_ref[cols, :], d_out, lse_rows, delta_rows, allowed, scale)
        return tuple(dq + _dot(ds, k, (1, 0)) for dq, ds, k in zip(d_queries, d_logits, keys, strict=True))

    init = tuple(jnp.zeros(queries[0].shape, jnp.float32) for _ in range(n))
    d_queries = lax.fori_loop(0, _num_key_blocks(i, block_q, block_k), key_block, init)
    for b in range(n):
        dq_ref[b] = d_queries[b].astype(dq_ref.dtype)


def _load_coefficients(coef_ref) -> list:
    """Branch coefficients `[1, w_1, ...]`; the first is the constant 1 (no load, no multiply)."""
    return [1.0] + [coef_ref[b] for b in range(1, coef_ref.shape[0])]


def _num_key_blocks(i: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Key blocks query block `i` sees: those starting at or before its last row."""
    return lax.div((i + 1) * block_q - 1, block_k) + 1
