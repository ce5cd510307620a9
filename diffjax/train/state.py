"""The sharded train state and the compiled steps: parameters are born sharded, never whole on one host."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.config import ConfigError, model_config
from diffjax.model import VOCAB_AXES, DiffTransformer
from diffjax.parallel.sharding import as_rules, axis_size, logical_spec, tree_shardings, with_shardings
from diffjax.train.optimizer import make_optimizer
from diffjax.train.step import StepOptions, TrainState, eval_step, train_step

BATCH_AXES = ("act_batch", "act_length")


class Trainer(NamedTuple):
    options: StepOptions
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with the target shardings: what restores read into
    batch_sharding: NamedSharding
    train_step: jax.stages.Wrapped
    eval_step: jax.stages.Wrapped


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
    """Shardings from the model's logical axes and `config.sharding_rules`, and the jitted steps."""
    rules = as_rules(config.sharding_rules)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DiffTransformer(model_config(config), rngs=nnx.Rngs(0))))
    options = StepOptions(
        graphdef=graphdef,
        optimizer=make_optimizer(config),
        mesh=mesh,
        rules=rules,
        grad_accum_steps=config.grad_accum_steps,
        z_loss=config.z_loss,
    )
    shapes = jax.eval_shape(functools.partial(init_state, config, options))
    state_shardings = tree_shardings(shapes, mesh, rules)
    check_divisible(shapes.params, state_shardings.params)
    abstract_state = with_shardings(shapes, state_shardings)
    batch_sharding = NamedSharding(mesh, logical_spec(BATCH_AXES, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        functools.partial(train_step, options=options),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, options=options),
        in_shardings=(state_shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    return Trainer(options, state_shardings, abstract_state, batch_sharding, step, evaluate)


def check_divisible(shapes: nnx.State, shardings: nnx.State) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes (XLA would fail deep inside)."""
    for (path, shape), sharding in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings), strict=True
    ):
        for size, axes in zip(shape.shape, sharding.spec, strict=False):
            ways = axis_size(sharding.mesh, axes)
            if size % ways:
                name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
                what = "model.vocab_multiple" if name in VOCAB_AXES else "it"
                raise ConfigError(
                    f"parameter {name} has a dimension of {size} that does not split {ways} ways over mesh axes "
                    f"{axes}; make {what} a multiple of {ways}, or change mesh.shape"
                )


def init_state(config: ml_collections.ConfigDict, options: StepOptions) -> TrainState:
    params = nnx.state(DiffTransformer(model_config(config), rngs=nnx.Rngs(config.seed)))
    return TrainState(jnp.zeros((), jnp.int32), params, options.optimizer.init(params))


def create_state(config: ml_collections.ConfigDict, trainer: Trainer) -> TrainState:
    """Initialise directly into the target shardings (each device computes only its own shards)."""
    init = functools.partial(init_state, config, trainer.options)
    return jax.jit(init, out_shardings=trainer.state_shardings)()


def state_from_params(trainer: Trainer, params: nnx.State) -> TrainState:
    """Step 0 with given (e.g. pretrained) parameters and a fresh optimizer state."""

    def init(params: nnx.State) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, trainer.options.optimizer.init(params))

    return jax.jit(init, out_shardings=trainer.state_shardings)(params)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the global batch, as global arrays."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}
