"""Float64 NumPy reference for the three attention layers, written straight from SPEC sections 1, 3 and 4.

Independent of the package on purpose (no diffjax import): RMSNorm, RoPE, masking, GQA and lambda are
re-derived here, one head at a time with explicit head indices, so a layout or convention error in
diffjax cannot be copied into the reference that is meant to catch it.

Shapes: `x` `[B, T, E]`, `positions` / `segment_ids` `[B, T]` (segment 0 = padding, `None` = one
document per row), projection matrices `[in, out]` with `y = x @ w`.
"""

import numpy as np


def lambda_init(layer_index: int) -> float:
    """SPEC 1: lambda_init = 0.8 - 0.6 exp(-0.3 l) for the 0-based layer index l."""
    return 0.8 - 0.6 * np.exp(-0.3 * layer_index)


def rms_norm(x: np.ndarray, eps: float, gain: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis, optionally times a learnable gain."""
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed if gain is None else normed * gain


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding, NeoX convention: rotate the pairs (i, i + d/2) of `x` `[B, T, N, d]`."""
    width = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, width, 2, dtype=np.float64) / width)
    angles = positions.astype(np.float64)[:, :, None, None] * inv_freq  # [B, T, 1, d/2]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., : width // 2], x[..., width // 2 :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def allowed(segment_ids: np.ndarray | None, batch: int, length: int) -> np.ndarray:
    """Boolean `[B, T(query), T(key)]`: causal, same document, and nothing at all for padding queries."""
    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = np.broadcast_to(key <= query, (batch, length, length))
    if segment_ids is None:
        return mask
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = segment_ids[:, :, None] != 0
    return mask & same & real


def softmax_probs(q: np.ndarray, k: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) for one head, `[B, T, d] x [B, T, d] -> [B, T, T]`; fully masked rows are 0."""
    logits = np.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(mask, np.exp(logits - row_max), 0.0)
    total = np.sum(weights, axis=-1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


def _heads(y: np.ndarray, width: int) -> np.ndarray:
    """`[B, T, N * width] -> [B, T, N, width]`."""
    return y.reshape(*y.shape[:2], -1, width)


def _project(
    x: np.ndarray, positions: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, width: int, theta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v split into heads of `width`, RoPE on q and k."""
    q = rope(_heads(x @ wq, width), positions, theta)
    k = rope(_heads(x @ wk, width), positions, theta)
    return q, k, _heads(x @ wv, width)


def standard_attention(
    x: np.ndarray,
    positions: np.ndarray,
    segment_ids: np.ndarray | None,
    *,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    wo: np.ndarray,
    num_heads: int,
    num_kv_heads: int,
    theta: float,
) -> np.ndarray:
    """Baseline: 2H softmax heads of width d over 2Hkv K/V heads; query head h reads kv head h // n_rep."""
    width = x.shape[-1] // (2 * num_heads)
    n_rep = num_heads // num_kv_heads
    q, k, v = _project(x, positions, wq, wk, wv, width, theta)
    mask = allowed(segment_ids, *x.shape[:2])
    heads = []
    for h in range(2 * num_heads):
        probs = softmax_probs(q[:, :, h], k[:, :, h // n_rep], mask)
        heads.append(probs @ v[:, :, h // n_rep])
    return np.concatenate(heads, axis=-1) @ wo


def diff_attention_v1(
    x: np.ndarray,
    positions: np.ndarray,
    segment_ids: np.ndarray | None,
    *,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    wo: np.ndarray,
    lambda_q1: np.ndarray,
    lambda_k1: np.ndarray,
    lambda_q2: np.ndarray,
    lambda_k2: np.ndarray,
    subln_gain: np.ndarray | None,
    num_heads: int,
    num_kv_heads: int,
    layer_index: int,
    theta: float,
    eps: float,
) -> np.ndarray:
    """SPEC 1 with the Hugging Face layout: Q1/Q2 are q heads p and p + H, K1/K2 are k heads g and Hkv + g."""
    width = x.shape[-1] // (2 * num_heads)
    n_rep = num_heads // num_kv_heads
    q, k, v = _project(x, positions, wq, wk, wv, width, theta)
    mask = allowed(segment_ids, *x.shape[:2])
    init = lambda_init(layer_index)
    lam = np.exp(lambda_q1 @ lambda_k1) - np.exp(lambda_q2 @ lambda_k2) + init
    heads = []
    for p in range(num_heads):
        g = p // n_rep
        a1 = softmax_probs(q[:, :, p], k[:, :, g], mask)
        a2 = softmax_probs(q[:, :, num_heads + p], k[:, :, num_kv_heads + g], mask)
        values = np.concatenate([v[:, :, g], v[:, :, num_kv_heads + g]], axis=-1)  # width 2d
        heads.append(rms_norm((a1 - lam * a2) @ values, eps, subln_gain) * (1.0 - init))
    return np.concatenate(heads, axis=-1) @ wo


def diff_attention_v2(
    x: np.ndarray,
    positions: np.ndarray,
    segment_ids: np.ndarray | None,
    *,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    wo: np.ndarray,
    w_lambda: np.ndarray,
    num_heads: int,
    num_kv_heads: int,
    theta: float,
) -> np.ndarray:
    """SPEC 3: query heads (2p, 2p+1) over Hkv K/V heads of width d, per-token lambda = sigmoid(x W_lambda)."""
    width = x.shape[-1] // (2 * num_heads)
    group = 2 * num_heads // num_kv_heads  # query heads per kv head
    q, k, v = _project(x, positions, wq, wk, wv, width, theta)
    mask = allowed(segment_ids, *x.shape[:2])
    lam = 1.0 / (1.0 + np.exp(-(x @ w_lambda)))  # [B, T, H]

    def head(j: int) -> np.ndarray:
        return softmax_probs(q[:, :, j], k[:, :, j // group], mask) @ v[:, :, j // group]

    heads = [head(2 * p) - lam[:, :, p, None] * head(2 * p + 1) for p in range(num_heads)]
    return np.concatenate(heads, axis=-1) @ wo
