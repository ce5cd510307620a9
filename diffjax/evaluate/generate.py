"""Greedy decoding.

The whole buffer is re-run for every new token (no KV cache): exact, compiled once, and cheap at the
sample lengths a training run prints.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(graphdef: nnx.GraphDef, params: nnx.State, prompt: np.ndarray, num_tokens: int) -> np.ndarray:
    """The `num_tokens` ids that greedily follow the 1-D `prompt`."""
    length = len(prompt) + num_tokens
    buffer = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(prompt)

    @jax.jit
    def decode(params: nnx.State, buffer: jax.Array) -> jax.Array:
        def next_token(i: int, carry: tuple[nnx.State, jax.Array]) -> tuple[nnx.State, jax.Array]:
            params, buffer = carry
            logits = nnx.merge(graphdef, params)(buffer)[0, i - 1]
            return params, buffer.at[0, i].set(jnp.argmax(logits).astype(jnp.int32))

        return jax.lax.fori_loop(len(prompt), length, next_token, (params, buffer))[1]

    return np.asarray(decode(params, buffer))[0, len(prompt) :]
