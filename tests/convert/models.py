"""Tiny random diffjax models for the conversion tests, their logits and greedy generations.

Norm gains, the per-head gain and lambdas are randomised (not the ones of a fresh init), so a tensor
mapped to the wrong place or in the wrong row order changes the logits.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.convert.params import param_shapes, to_state
from diffjax.model import DiffTransformer, ModelConfig

BASE = ModelConfig(vocab_size=96, emb_dim=32, num_layers=3, num_heads=2, num_kv_heads=2, mlp_dim=64, init_std=0.1)
# name -> overrides of BASE: MHA, GQA with n_rep 2 and 4, tied and untied, gain on and off, the baseline
CASES = {
    "mha_tied_gain": dict(),
    "gqa2_untied_nogain": dict(num_kv_heads=1, tie_embeddings=False, subln_affine=False),
    "gqa4_tied_gain": dict(emb_dim=64, num_heads=4, num_kv_heads=1),
    "standard_untied": dict(attention_type="standard", num_kv_heads=1, tie_embeddings=False),
}


def case_config(name: str, **overrides) -> ModelConfig:
    return dataclasses.replace(BASE, **(CASES[name] | overrides))


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights N(0, init_std), gains uniform in [0.5, 1.5), lambdas N(0, 0.3) (NumPy: no model is initialised)."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("/scale"):
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.3 if "lambda_" in name else cfg.init_std, shape)

    return {name: draw(name, shape).astype(np.float32) for name, shape in param_shapes(cfg).items()}


def greedy(cfg: ModelConfig, params: dict[str, np.ndarray], prompts: np.ndarray, num_tokens: int) -> np.ndarray:
    """The `num_tokens` ids that greedily follow each row of `prompts`: one compiled shape for every step."""
    graphdef, state = split_model(cfg, params)
    buffer = np.zeros((prompts.shape[0], prompts.shape[1] + num_tokens), np.int32)
    buffer[:, : prompts.shape[1]] = prompts
    for i in range(prompts.shape[1], buffer.shape[1]):
        buffer[:, i] = np.argmax(np.asarray(_logits(graphdef, state, jnp.asarray(buffer)))[:, i - 1], axis=-1)
    return buffer[:, prompts.shape[1] :]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model(tokens)[..., : model.cfg.vocab_size].astype(jnp.float32)


def split_model(cfg: ModelConfig, params: dict[str, np.ndarray]) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DiffTransformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, to_state(params, cfg)


def logits(cfg: ModelConfig, params: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """float32 logits of diffjax's forward pass."""
    return np.asarray(_logits(*split_model(cfg, params), jnp.asarray(tokens, jnp.int32)))


def tokens(cfg: ModelConfig, batch: int = 2, length: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


def assert_same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Bit-exact equality of two flat parameter dicts (names, shapes, dtypes and values)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
