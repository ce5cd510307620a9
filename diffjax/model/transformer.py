"""The decoder: pre-norm blocks stacked along a leading layer axis and run with a scan."""

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.model.attention import ATTENTION_OUTPUT, ATTENTION_TYPES, KVCache, LayerConstants
from diffjax.model.layers import RMSNorm, SwiGLU, dense, logical
from diffjax.model.model_config import ModelConfig
from diffjax.parallel.sharding import constrain

LAYER_AXIS = {nnx.PARTITION_NAME: "layers"}  # the stacked-layer axis of every block parameter
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
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, layer)
        return x + self.mlp(self.mlp_norm(x))

    def decode(
        self, x: jax.Array, layer: LayerConstants, cache: KVCache, index: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for tokens at positions `start + [0, T)`, attending through layer `index` of `cache`."""
        attended, cache = self.attn.decode(self.attn_norm(x), layer, cache, index, start)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


class DiffTransformer(nnx.Module):
    """Decoder-only language model; `blocks` holds every layer's weights stacked on axis 0."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.emb_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=logical(nnx.initializers.normal(cfg.init_std), ("vocab", "embed")),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYER_AXIS)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(cfg.emb_dim, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = (
            None if cfg.tie_embeddings else dense(cfg, cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)
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
        """int `[B, T]` tokens -> `[B, T, vocab]` logits in the activation dtype.

        `positions` (default `0..T-1`) feed RoPE; `segment_ids` (0 = padding) keep packed documents
        from attending to each other.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        block_call = Block.__call__
        if self.cfg.remat_policy != "none":
            block_call = nnx.remat(block_call, policy=REMAT_POLICIES[self.cfg.remat_policy])

        unroll = 1 if self.cfg.scan_layers else self.cfg.num_layers

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS, unroll=unroll)
        def run_layers(x: jax.Array, block: Block, layer: LayerConstants) -> jax.Array:
            return constrain(block_call(block, x, positions, segment_ids, layer), ACTIVATIONS)

        x = run_layers(constrain(self.embed(tokens), ACTIVATIONS), self.blocks, self.layer_constants())
        return self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: `[B, T, E]` hidden states -> `[B, T, vocab]` logits."""
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
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
