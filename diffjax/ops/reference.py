"""Dense XLA attention cores: the numerical reference every faster implementation is tested against.

Shapes: queries `[B, T, Hq, d]`, keys `[B, T, Hkv, d]`, values `[B, T, Hkv, dv]` with `Hq % Hkv == 0`
(query head `h` reads key/value head `h // (Hq / Hkv)`; K/V are never repeated in memory).
`segment_ids` `[B, T]` (0 = padding) restricts attention to the query's own document; attention is
always causal. Casts follow SPEC section 1: logits in the activation dtype, softmax in float32, the
probabilities cast back before they meet V.

`masked_attention` and `masked_diff_attention` take an explicit mask instead, so queries may be fewer than
keys: decoding attends the new tokens against a whole KV cache (`diffjax.ops.dispatch.CachedCore`).
"""

import jax
import jax.numpy as jnp

from diffjax.ops.tiles import MASKED


def causal_mask(segment_ids: jax.Array | None, length: int) -> jax.Array:
    """Boolean `[B or 1, 1, 1, T, T]` mask: causal, same segment, and never from a padding query."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    if segment_ids is None:
        return causal[None, None, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    return (causal[None] & same & real)[:, None, None]


def _logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q k^T / sqrt(d) in q's dtype, `[B, Hkv, R, T, S]` (query head `g R + r` reads key head `g`)."""
    batch, length, num_q, width = q.shape
    num_kv = k.shape[2]
    grouped = q.reshape(batch, length, num_kv, num_q // num_kv, width)
    return jnp.einsum("btgrd,bsgd->bgrts", grouped, k) / jnp.sqrt(width).astype(q.dtype)


def _softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the keys `mask` allows; fully masked rows are exactly zero."""
    logits = jnp.where(mask, logits.astype(jnp.float32), MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)


def _probabilities(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) as `[B, Hkv, R, T, S]` in q's dtype."""
    return _softmax(_logits(q, k), mask).astype(q.dtype)


def scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pre-softmax logits (computed as the cores compute them) and the attention probabilities, both
    float32 `[B, Hq, T, S]`, for inspecting a model rather than running it; `mask` as in `masked_attention`."""
    logits = _logits(q, k)
    probs = _softmax(logits, mask)

    def by_query_head(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1, *x.shape[-2:])

    return by_query_head(logits.astype(jnp.float32)), by_query_head(probs)


def _weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """`[B, Hkv, R, T, S] x [B, S, Hkv, dv] -> [B, T, Hkv * R, dv]`."""
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
    batch, length, num_kv, rep, width = out.shape
    return out.reshape(batch, length, num_kv * rep, width)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal softmax attention `[B, T, Hq, d] -> [B, T, Hq, dv]` (standard baseline and V2)."""
    return masked_attention(q, k, v, causal_mask(segment_ids, q.shape[1]))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of `[B, T, Hq, d]` queries over `[B, S, Hkv, d]` keys where boolean `mask`
    (broadcastable to `[B, 1, 1, T, S]`) allows."""
    return _weighted_values(_probabilities(q, k, mask), v)


def diff_attention(
    q1: jax.Array,
    q2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    v: jax.Array,
    lam: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Differential attention core `(A1 V) - lam (A2 V)`: `[B, T, H, d] ... -> [B, T, H, 2d]`.

    `v` is `[B, T, Hkv, 2d]`; `lam` is a scalar in the activation dtype. The two branch outputs are
    formed separately and combined in the activation dtype, in Hugging Face DiffLlama's order, for
    bfloat16 parity with it.
    """
    return masked_diff_attention(q1, q2, k1, k2, v, lam, causal_mask(segment_ids, q1.shape[1]))


def masked_diff_attention(
    q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, v: jax.Array, lam: jax.Array, mask: jax.Array
) -> jax.Array:
    """`diff_attention` with an explicit mask, as in `masked_attention`."""
    out1 = masked_attention(q1, k1, v, mask)
    out2 = masked_attention(q2, k2, v, mask)
    return out1 - lam * out2
