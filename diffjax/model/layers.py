"""Building blocks shared by every attention type: RMSNorm, rotary embeddings, SwiGLU, dense layers."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.model.model_config import ModelConfig
from diffjax.parallel.sharding import constrain


def logical(init: nnx.Initializer, axes: tuple[str | None, ...]) -> nnx.Initializer:
    """`init` whose parameter carries logical axis names; the trainer maps them to mesh axes.

    Eager sharding is off: the model never needs a mesh, and the trainer places parameters itself.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dense(
    cfg: ModelConfig,
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    init: nnx.Initializer | None = None,
) -> nnx.Linear:
    """Bias-free projection with the model's dtypes and N(0, init_std) init (as Hugging Face initialises)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=logical(init or nnx.initializers.normal(cfg.init_std), axes),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis: statistics in float32, cast back, then times the gain (SPEC cast order)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, affine: bool = True):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        normed = normed.astype(x.dtype)
        if self.scale is None:
            return normed
        return normed * self.scale[...].astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """NeoX rotary convention: `[x1, x2] -> [-x2, x1]` over halves of the last axis."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of `x` `[B, T, N, d]` at integer `positions` `[B, T]` (angles in float32)."""
    width = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nnx.Module):
    """`down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        linear = functools.partial(dense, cfg, rngs=rngs)
        self.gate_proj = linear(cfg.emb_dim, cfg.mlp_dim, ("embed", "mlp"))
        self.up_proj = linear(cfg.emb_dim, cfg.mlp_dim, ("embed", "mlp"))
        self.down_proj = linear(cfg.mlp_dim, cfg.emb_dim, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("act_batch", "act_length", "act_mlp"))
        return self.down_proj(hidden)
