"""Pure train and eval steps over `(graphdef, params)`: what `jax.jit` compiles with shardings."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from diffjax.parallel.sharding import Rules, activation_sharding


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


class StepOptions(NamedTuple):
    """Static settings of the compiled step."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: Rules
    grad_accum_steps: int = 1
    z_loss: float = 0.0


def loss_sums(
    params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], z_loss: float = 0.0
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(objective sum, (cross-entropy sum, kept-token count)) over the tokens `loss_mask` keeps.

    Sums, not means, so micro-batches and data shards combine exactly: divide by the total count.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32)
    cross_entropy = (optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask).sum()
    objective = cross_entropy
    if z_loss:
        objective += z_loss * (jnp.square(jax.nn.logsumexp(logits, axis=-1)) * mask).sum()
    return objective, (cross_entropy, mask.sum())


def loss_and_count(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
    """Mean next-token cross entropy over the kept tokens, and their count."""
    _, (cross_entropy, count) = loss_sums(params, graphdef, batch)
    return cross_entropy / jnp.maximum(count, 1.0), count


def _micro_batches(batch: dict[str, jax.Array], steps: int) -> dict[str, jax.Array]:
    """`[B, ...] -> [steps, B / steps, ...]` taking rows strided, so every data shard feeds every micro-batch."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1), batch)


def _summed_gradients(params: nnx.State, batch: dict[str, jax.Array], options: StepOptions):
    """Summed gradients, cross entropy and token count, accumulated over micro-batches with a scan."""
    grad_fn = jax.grad(loss_sums, has_aux=True)
    if options.grad_accum_steps == 1:
        return grad_fn(params, options.graphdef, batch, options.z_loss)

    def accumulate(carry, micro_batch):
        grads, (cross_entropy, count) = grad_fn(params, options.graphdef, micro_batch, options.z_loss)
        return jax.tree.map(jnp.add, carry, (grads, (cross_entropy, count))), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())))
    totals, _ = jax.lax.scan(accumulate, zeros, _micro_batches(batch, options.grad_accum_steps))
    return totals


def mean_gradients(
    params: nnx.State, batch: dict[str, jax.Array], options: StepOptions
) -> tuple[nnx.State, jax.Array, jax.Array]:
    """Gradients and loss per kept token of the whole batch (however it is split), and the token count."""
    with activation_sharding(options.mesh, options.rules):
        grads, (cross_entropy, count) = _summed_gradients(params, batch, options)
    denominator = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denominator, grads), cross_entropy / denominator, count


def train_step(
    state: TrainState, batch: dict[str, jax.Array], options: StepOptions
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW update. A non-finite loss or gradient leaves params and optimizer state untouched."""
    grads, loss, count = mean_gradients(state.params, batch, options)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = options.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "tokens": count,
        "finite": finite,
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: nnx.State, batch: dict[str, jax.Array], options: StepOptions) -> tuple[jax.Array, jax.Array]:
    """Summed cross entropy and token count, so a split's mean is exact however it is batched."""
    with activation_sharding(options.mesh, options.rules):
        _, (cross_entropy, count) = loss_sums(params, options.graphdef, batch)
    return cross_entropy, count
