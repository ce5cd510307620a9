"""The decoder: pre-norm blocks stacked along a leading layer axis and run with a scan."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.model.attention import ATTENTION_OUTPUT, ATTENTION_TYPES, AttentionMaps, KVCache, LayerConstants
from diffjax.model.layers import RMSNorm, SwiGLU, dense, logical
from diffjax.model.model_config import ModelConfig
from diffjax.ops.reference import causal_mask
from diffjax.parallel.sharding import constrain

LAYER_AXIS = {nnx.PARTITION_NAME: "layers"}  # the stacked-layer axis of every block parameter
VOCAB_AXES = {"embed/embedding": 0, "lm_head/kernel": 1}  # parameters with a row per (padded) vocabulary entry
ACTIVATIONS = ("act_batch", "act_length", "act_embed")

REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep each attention core's output (named in attention.py); recompute projections and the MLP.
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
}


class Block(nnx.Module):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.emb_dim, **norm)
        self.attn = ATTENTION_TYPES[cfg.attention_type](cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.emb_dim, **norm)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, layer: LayerConstants
    ) -> jax.Array:
        return self._add_mlp(x + self.attn(self.attn_norm(x), positions, segment_ids, layer))

    def _add_mlp(self, x: jax.Array) -> jax.Array:
        return x + self.mlp(self.mlp_norm(x))

    def decode(
        self, x: jax.Array, layer: LayerConstants, cache: KVCache, index: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for tokens at positions `start + [0, T)`, attending through layer `index` of `cache`."""
        attended, cache = self.attn.decode(self.attn_norm(x), layer, cache, index, start)
        return self._add_mlp(x + attended), cache

    def probe(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        layer: LayerConstants,
        rows: jax.Array | None = None,
    ) -> tuple[jax.Array, AttentionMaps]:
        """`__call__`, and the attention maps it applied: every query's, or only those of query positions
        `rows` `[B, R]` (maps `[B, heads, R, T]`, without the `T x T` ones)."""
        normed = self.attn_norm(x)
        qkv = self.attn.project(normed, positions)
        mask = causal_mask(segment_ids, x.shape[1])
        if rows is None:
            maps = self.attn.maps(normed, qkv, layer, mask)
        else:
            q, k, v = qkv
            mask = jnp.broadcast_to(mask, (x.shape[0], *mask.shape[1:]))
            maps = self.attn.maps(
                jnp.take_along_axis(normed, rows[:, :, None], axis=1),
                (jnp.take_along_axis(q, rows[:, :, None, None], axis=1), k, v),
                layer,
                jnp.take_along_axis(mask, rows[:, None, None, :, None], axis=3),
            )
        return self._add_mlp(x + self.attn.attend(normed, qkv, layer, self.attn.core, segment_ids)), maps


class DiffTransformer(nnx.Module):
    """Decoder-only language model; `blocks` holds every layer's weights stacked on axis 0."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.padded_vocab_size,
            cfg.emb_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=logical(vocab_rows_init(cfg, axis=0), ("vocab", "embed")),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYER_AXIS)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(cfg.emb_dim, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else dense(
                cfg, cfg.emb_dim, cfg.padded_vocab_size, ("embed", "vocab"), rngs=rngs, init=vocab_rows_init(cfg, 1)
            )
        )

    def layer_constants(self) -> LayerConstants:
        lambda_init = self.cfg.lambda_inits()
        return LayerConstants(
            lambda_init=jnp.asarray(lambda_init, jnp.float32),
            output_scale=jnp.asarray(1.0 - lambda_init, jnp.float32),
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """int `[B, T]` tokens -> `[B, T, padded_vocab_size]` logits in the activation dtype (padding masked).

        `positions` (default `0..T-1`) feed RoPE; `segment_ids` (0 = padding) keep packed documents
        from attending to each other.
        """
        positions = _default_positions(tokens, positions)
        block_call = Block.__call__
        if self.cfg.remat_policy != "none":
            block_call = nnx.remat(block_call, policy=REMAT_POLICIES[self.cfg.remat_policy])

        unroll = 1 if self.cfg.scan_layers else self.cfg.num_layers

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS, unroll=unroll)
        def run_layers(x: jax.Array, block: Block, layer: LayerConstants) -> jax.Array:
            return constrain(block_call(block, x, positions, segment_ids, layer), ACTIVATIONS)

        x = run_layers(constrain(self.embed(tokens), ACTIVATIONS), self.blocks, self.layer_constants())
        return self.logits(x)

    def probe(
        self,
        tokens: jax.Array,
        reduce: Callable[[jax.Array, AttentionMaps], Any],
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rows: jax.Array | None = None,
    ) -> Any:
        """`reduce(hidden, maps)` of every layer, stacked on a leading layer axis: what evaluation measures.

        `hidden` `[B, T, E]` is the layer's output (the residual stream) and `maps` its attention, dense
        and in float32; `reduce` runs inside the layer scan, so only what it keeps outlives the layer.
        With `rows` `[B, R]` the maps are only those query positions' rows (`[B, heads, R, T]`): a cost of
        R x T per layer instead of T x T.
        """
        positions = _default_positions(tokens, positions)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_AXIS)
        def run_layers(x: jax.Array, block: Block, layer: LayerConstants) -> tuple[jax.Array, Any]:
            x, maps = block.probe(x, positions, segment_ids, layer, rows)
            return x, reduce(x, maps)

        return run_layers(self.embed(tokens), self.blocks, self.layer_constants())[1]

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: `[B, T, E]` hidden states -> `[B, T, padded_vocab_size]` logits.

        The padding's logits are the dtype's lowest value: zero probability in the loss and in sampling, and
        no gradient, so a padded model computes what the unpadded one does (up to summation order).
        """
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        if self.cfg.padded_vocab_size > self.cfg.vocab_size:
            real = jnp.arange(self.cfg.padded_vocab_size) < self.cfg.vocab_size
            logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` positions."""
        attn = self.blocks.attn

        def stack(projection: nnx.Linear) -> jax.Array:
            heads = projection.out_features // attn.head_dim
            return jnp.zeros((self.cfg.num_layers, batch, length, heads, attn.head_dim), self.cfg.dtype)

        return KVCache(stack(attn.k_proj), stack(attn.v_proj))

    def decode(self, tokens: jax.Array, cache: KVCache, start: jax.Array) -> tuple[jax.Array, KVCache]:
        """Logits of int `[B, T]` tokens at positions `start + [0, T)` given the earlier positions' keys and
        values in `cache`, and the cache with these tokens' added: `__call__`'s logits, a step at a time."""
        start = jnp.asarray(start, jnp.int32)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS)
        def run_layers(
            carry: tuple[jax.Array, KVCache], block: Block, layer: LayerConstants, index: jax.Array
        ) -> tuple[jax.Array, KVCache]:
            x, cache = carry
            return block.decode(x, layer, cache, index, start)

        layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        x, cache = run_layers((self.embed(tokens), cache), self.blocks, self.layer_constants(), layers)
        return self.logits(x), cache


def vocab_rows_init(cfg: ModelConfig, axis: int) -> nnx.Initializer:
    """N(0, init_std) over the real vocabulary along `axis` (the draw an unpadded model makes), zeros in the
    padding: rows that are never looked up and whose logits are masked get no gradient and stay zero."""
    normal = nnx.initializers.normal(cfg.init_std)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        real, padding = list(shape), [(0, 0)] * len(shape)
        real[axis], padding[axis] = cfg.vocab_size, (0, shape[axis] - cfg.vocab_size)
        return jnp.pad(normal(key, tuple(real), dtype), padding)

    return init


def parameter_count(params: nnx.State, cfg: ModelConfig) -> int:
    """The model's parameters, not counting the zero rows that pad its vocabulary."""
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.emb_dim * (1 if cfg.tie_embeddings else 2)
    return sum(x.size for x in jax.tree.leaves(params)) - padding


def _default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    """`positions`, or `0..T-1` for every row."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
