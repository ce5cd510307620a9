"""Attention layers: differential attention v1 (the paper), v2, and the standard-Transformer baseline.

All three use the Hugging Face head layout (SPEC section 1), so exporting to `DiffLlamaForCausalLM` is
a transpose: query heads `[0, H)` are the first softmax branch and `[H, 2H)` the second, likewise
for key/value heads `[0, Hkv)` and `[Hkv, 2Hkv)`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from diffjax.model.layers import RMSNorm, apply_rope, dense, param
from diffjax.model.model_config import ModelConfig
from diffjax.ops import reference
from diffjax.ops.dispatch import AttentionCore, CachedCore
from diffjax.parallel.sharding import constrain

ATTENTION_OUTPUT = "attention_output"  # checkpoint name of the attention core's result (remat policies)
Heads = tuple[jax.Array, jax.Array, jax.Array]  # projected q, k, v `[B, T or S, heads, d]`
Segments = jax.Array | None


class LayerConstants(NamedTuple):
    """Per-layer float32 scalars derived from the layer index (scanned alongside the stacked weights).

    Both come from float64 like Hugging Face's Python floats, for bfloat16 parity with it.
    """

    lambda_init: jax.Array  # 0.8 - 0.6 exp(-0.3 l)
    output_scale: jax.Array  # 1 - lambda_init, applied after the per-head RMSNorm


class KVCache(NamedTuple):
    """Every layer's projected keys and values for decoding, `[layers, B, S, heads, d]` in the activation
    dtype (Hugging Face head layout, RoPE applied); the token at position `p` sits in slot `p`."""

    keys: jax.Array
    values: jax.Array


class AttentionMaps(NamedTuple):
    """One layer's attention laid open, float32, for evaluation: `positive - negative` weights the values.

    Query heads follow the Hugging Face layout; the maps have one head per output head (H for differential
    attention, 2H for the standard baseline). `mask` (boolean, broadcastable to `[B, 1, T, T]`) marks the
    (query, key) pairs attention may see; elsewhere logits are meaningless and maps are zero.
    """

    logits: jax.Array  # [B, Hq, T, T]: q k^T / sqrt(d) of every query head (both branches of DIFF)
    positive: jax.Array  # [B, H, T, T]: A (standard), A1 (v1), the even heads' A (v2)
    negative: jax.Array | None  # [B, H, T, T]: lambda A2 (v1), lambda_t times the odd heads' A (v2), None
    mask: jax.Array

    @property
    def effective(self) -> jax.Array:
        """The map the values are weighted by: A, or A1 - lambda A2."""
        return self.positive if self.negative is None else self.positive - self.negative


class _ProjectedAttention(nnx.Module):
    """Base of every attention layer: q/k/v projections split into heads, RoPE on queries and keys, and the
    attention core chosen by `cfg.attention_impl`; subclasses say what `attend` does with them."""

    def __init__(self, cfg: ModelConfig, num_q: int, num_kv: int, *, rngs: nnx.Rngs):
        linear = functools.partial(dense, cfg, rngs=rngs)
        self.core = AttentionCore(cfg.attention_impl, cfg.attention_block_q, cfg.attention_block_k)
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = linear(cfg.emb_dim, num_q * cfg.head_dim, ("embed", "heads"))
        self.k_proj = linear(cfg.emb_dim, num_kv * cfg.head_dim, ("embed", "kv_heads"))
        self.v_proj = linear(cfg.emb_dim, num_kv * cfg.head_dim, ("embed", "kv_heads"))

    def project(self, x: jax.Array, positions: jax.Array) -> Heads:
        batch, length, _ = x.shape

        def heads(y: jax.Array) -> jax.Array:
            y = y.reshape(batch, length, -1, self.head_dim)
            return constrain(y, ("act_batch", "act_length", "act_heads", None))

        q = apply_rope(heads(self.q_proj(x)), positions, self.rope_theta)
        k = apply_rope(heads(self.k_proj(x)), positions, self.rope_theta)
        return q, k, heads(self.v_proj(x))

    def attend(
        self, x: jax.Array, qkv: Heads, layer: LayerConstants, core: AttentionCore, segment_ids: Segments
    ) -> jax.Array:
        """The layer's output for input `x` from its projected heads `(q, k, v)`, attending through `core`."""
        raise NotImplementedError

    def maps(self, x: jax.Array, qkv: Heads, layer: LayerConstants, mask: jax.Array) -> AttentionMaps:
        """The attention maps `attend` applies to input `x`, densely (`mask` from `reference.causal_mask`)."""
        raise NotImplementedError

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        layer: LayerConstants,
    ) -> jax.Array:
        return self.attend(x, self.project(x, positions), layer, self.core, segment_ids)

    def decode(
        self, x: jax.Array, layer: LayerConstants, cache: KVCache, index: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """`x` `[B, T, E]` at positions `start + [0, T)`: write its keys and values into slots `start...` of
        layer `index` of `cache`, attend over that layer's cache, and return the output and the new cache."""
        positions = jnp.broadcast_to(start + jnp.arange(x.shape[1]), x.shape[:2])
        q, k, v = self.project(x, positions)

        def write(stack: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
            """The cache stack with `new` in place, and this layer's slice of it."""
            stack = jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), (index, 0, start, 0, 0))
            return stack, jax.lax.dynamic_index_in_dim(stack, index, keepdims=False)

        (keys, k), (values, v) = write(cache.keys, k), write(cache.values, v)
        return self.attend(x, (q, k, v), layer, CachedCore(start=start), None), KVCache(keys, values)


class DiffAttention(_ProjectedAttention):
    """Multi-head differential attention, version 1 (Ye et al., ICLR 2025), with GQA."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        super().__init__(cfg, 2 * cfg.num_heads, 2 * cfg.num_kv_heads, rngs=rngs)
        self.o_proj = dense(cfg, cfg.emb_dim, cfg.emb_dim, ("heads", "embed"), rngs=rngs)

        def lambda_vector() -> nnx.Param:
            init = nnx.initializers.normal(cfg.lambda_std_dev)
            return param(init(rngs.params(), (cfg.head_dim,), cfg.param_dtype), ("head_dim",))

        self.lambda_q1, self.lambda_k1 = lambda_vector(), lambda_vector()
        self.lambda_q2, self.lambda_k2 = lambda_vector(), lambda_vector()
        self.subln = RMSNorm(
            2 * cfg.head_dim, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype, affine=cfg.subln_affine
        )

    def lambda_full(self, lambda_init: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """exp(<lq1, lk1>) - exp(<lq2, lk2>) + lambda_init, cast where Hugging Face casts."""

        def branch(lq: nnx.Param, lk: nnx.Param) -> jax.Array:
            return jnp.exp(jnp.sum(lq[...] * lk[...], dtype=jnp.float32)).astype(dtype)

        difference = branch(self.lambda_q1, self.lambda_k1) - branch(self.lambda_q2, self.lambda_k2)
        return (difference.astype(jnp.float32) + lambda_init).astype(dtype)

    def attend(
        self, x: jax.Array, qkv: Heads, layer: LayerConstants, core: AttentionCore, segment_ids: Segments
    ) -> jax.Array:
        (q, k, v), h, g = qkv, self.num_heads, self.num_kv_heads
        values = jnp.concatenate([v[:, :, :g], v[:, :, g:]], axis=-1)
        lam = self.lambda_full(layer.lambda_init, x.dtype)
        out = core.diff_attention(q[:, :, :h], q[:, :, h:], k[:, :, :g], k[:, :, g:], values, lam, segment_ids)
        out = checkpoint_name(out, ATTENTION_OUTPUT)
        out = (self.subln(out).astype(jnp.float32) * layer.output_scale).astype(x.dtype)
        return self.o_proj(out.reshape(*x.shape[:2], -1))

    def maps(self, x: jax.Array, qkv: Heads, layer: LayerConstants, mask: jax.Array) -> AttentionMaps:
        (q, k, _), h, g = qkv, self.num_heads, self.num_kv_heads
        logits1, first = reference.scores(q[:, :, :h], k[:, :, :g], mask)
        logits2, second = reference.scores(q[:, :, h:], k[:, :, g:], mask)
        lam = self.lambda_full(layer.lambda_init, x.dtype).astype(jnp.float32)
        return AttentionMaps(jnp.concatenate([logits1, logits2], axis=1), first, lam * second, mask[:, 0])


class DiffAttentionV2(_ProjectedAttention):
    """Differential attention v2 (SPEC section 3): adjacent query-head pairs, per-token sigmoid lambda."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, 2 * cfg.num_heads, cfg.num_kv_heads, rngs=rngs)
        self.lambda_proj = dense(cfg, cfg.emb_dim, cfg.num_heads, ("embed", None), rngs=rngs)
        self.o_proj = dense(cfg, cfg.num_heads * cfg.head_dim, cfg.emb_dim, ("heads", "embed"), rngs=rngs)

    def attend(
        self, x: jax.Array, qkv: Heads, layer: LayerConstants, core: AttentionCore, segment_ids: Segments
    ) -> jax.Array:
        del layer  # v2 has no lambda_init and no output scale
        attn = checkpoint_name(core.attention(*qkv, segment_ids), ATTENTION_OUTPUT)
        lam = jax.nn.sigmoid(self.lambda_proj(x).astype(jnp.float32)).astype(x.dtype)
        out = attn[:, :, 0::2] - lam[..., None] * attn[:, :, 1::2]
        return self.o_proj(out.reshape(*x.shape[:2], -1))

    def maps(self, x: jax.Array, qkv: Heads, layer: LayerConstants, mask: jax.Array) -> AttentionMaps:
        del layer
        (q, k, _), lam = qkv, jax.nn.sigmoid(self.lambda_proj(x).astype(jnp.float32))
        logits, probs = reference.scores(q, k, mask)
        return AttentionMaps(logits, probs[:, 0::2], lam.transpose(0, 2, 1)[..., None] * probs[:, 1::2], mask[:, 0])


class StandardAttention(_ProjectedAttention):
    """The paper's baseline: softmax attention with 2H heads of width d, same parameter count as v1."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, 2 * cfg.num_heads, 2 * cfg.num_kv_heads, rngs=rngs)
        self.o_proj = dense(cfg, cfg.emb_dim, cfg.emb_dim, ("heads", "embed"), rngs=rngs)

    def attend(
        self, x: jax.Array, qkv: Heads, layer: LayerConstants, core: AttentionCore, segment_ids: Segments
    ) -> jax.Array:
        del layer  # no differential terms
        out = checkpoint_name(core.attention(*qkv, segment_ids), ATTENTION_OUTPUT)
        return self.o_proj(out.reshape(*x.shape[:2], -1))

    def maps(self, x: jax.Array, qkv: Heads, layer: LayerConstants, mask: jax.Array) -> AttentionMaps:
        del x, layer
        logits, probs = reference.scores(qkv[0], qkv[1], mask)
        return AttentionMaps(logits, probs, None, mask[:, 0])


ATTENTION_TYPES: dict[str, type[nnx.Module]] = {
    "diff": DiffAttention,
    "diff_v2": DiffAttentionV2,
    "standard": StandardAttention,
}
