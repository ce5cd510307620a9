"""Fused attention under `shard_map` on a 4-device CPU mesh against the reference on one device (run by the tests).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/ops/sharded_attention.py

Prints {"mesh": [...], "max_errors": {name: error}} for the loss and every gradient, lambda's included (its
cotangent is summed over the shards that each saw a part of the batch and heads).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.ops import reference
from diffjax.ops.dispatch import AttentionCore
from diffjax.parallel.mesh import make_mesh
from diffjax.parallel.sharding import DEFAULT_RULES, activation_sharding

NAMES = ["loss", "q1", "q2", "k1", "k2", "v", "lambda"]


def main() -> None:
    mesh = make_mesh((1, 2, 2))
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, width = 2, 24, 4, 2, 8
    shapes = [(batch, length, heads, width)] * 2 + [(batch, length, kv_heads, width)] * 2
    shapes.append((batch, length, kv_heads, 2 * width))
    arrays = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]
    segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((batch, length, heads, 2 * width)), jnp.float32)

    def loss(core, mesh=None):
        def f(*args):
            if mesh is None:
                return jnp.sum(weights * core(*args, segment_ids))
            with activation_sharding(mesh, DEFAULT_RULES):
                return jnp.sum(weights * core(*args, segment_ids))

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6))))(*arrays, jnp.float32(0.4))

    got = jax.tree.leaves(loss(AttentionCore("pallas").diff_attention, mesh))
    want = jax.tree.leaves(loss(reference.diff_attention))
    errors = {
        name: float(np.abs(np.asarray(g) - np.asarray(w)).max()) for name, g, w in zip(NAMES, got, want, strict=True)
    }
    print(json.dumps({"mesh": dict(mesh.shape), "max_errors": errors}))


if __name__ == "__main__":
    main()
