"""Pure train and eval steps over `(graphdef, params)`: what `jax.jit` compiles."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def loss_and_count(
    params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross entropy over the tokens `loss_mask` keeps, and how many those are."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    count = mask.sum()
    return (losses * mask).sum() / jnp.maximum(count, 1.0), count


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW update; returns the new state and this step's metrics (still on device)."""
    (loss, count), grads = jax.value_and_grad(loss_and_count, has_aux=True)(state.params, graphdef, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
    """Summed loss and token count, so a split's mean is exact however it is batched."""
    loss, count = loss_and_count(params, graphdef, batch)
    return loss * count, count
