"""What every tiled (online-softmax) attention core shares: mask values and how branches combine.

Cores compute `n` softmax branches over the same V and combine them as `o_1 + sum_b weights[b-1] o_b`
(differential attention: `n = 2`, `weights = [-lambda]`; standard attention: `n = 1`).
"""

import jax
import jax.numpy as jnp
import numpy as np

# Logit of a forbidden (query, key) pair.
MASKED = float(np.finfo(np.float32).min)
# Running max (and log-sum-exp) of a row that has seen no allowed key: finite and far above MASKED, so
# exp(MASKED - EMPTY) == 0 and a fully masked row gets zero probabilities and gradients, never NaN.
EMPTY = -1e30


def branch_coefficients(weights: jax.Array) -> jax.Array:
    """`[1, *weights]`: each branch's float32 factor in the output."""
    return jnp.concatenate([jnp.ones((1,), jnp.float32), weights.astype(jnp.float32)])
