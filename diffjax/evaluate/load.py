"""Load a trained model from a run directory, for scripts and notebooks.

    from diffjax import load_model
    model, config = load_model("runs/tiny")          # latest complete checkpoint
    logits = model(tokens)                           # int32 [B, T] -> float32 [B, T, vocab]

Parameters are read straight into shards over every visible device (FSDP), so a checkpoint of any
size or mesh loads on any device count that can hold it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from diffjax.config import ConfigError, model_config
from diffjax.files import PathLike
from diffjax.model import DiffTransformer
from diffjax.parallel.mesh import make_mesh
from diffjax.parallel.sharding import as_rules, tree_shardings, with_shardings
from diffjax.train.checkpoint import find_checkpoint, read_metadata, restore_params


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, params: nnx.State, tokens, positions, segment_ids) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, segment_ids)[..., : model.cfg.vocab_size].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained Differential Transformer: call it on tokens; `module` is the Flax NNX module itself."""

    graphdef: nnx.GraphDef
    params: nnx.State
    step: int

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """int32 `[B, T]` tokens -> float32 `[B, T, vocab]` next-token logits (compiled once per shape)."""
        return _logits(self.graphdef, self.params, jnp.asarray(tokens, jnp.int32), positions, segment_ids)

    @property
    def module(self) -> DiffTransformer:
        return nnx.merge(self.graphdef, self.params)


def load_model(workdir: PathLike, step: int | None = None) -> tuple[LoadedModel, ml_collections.ConfigDict]:
    """The model of `workdir` (or its `checkpoints/`, or one step's directory) and the config it trained with.

    `step=None` takes the latest complete checkpoint.
    """
    directory, latest = find_checkpoint(workdir)
    step = latest if step is None else step
    if not (directory / str(step)).is_dir():
        available = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        raise ConfigError(f"no checkpoint of step {step} in {directory}; it holds steps {available}")
    config = ml_collections.ConfigDict(read_metadata(directory, step)["config"])
    abstract = nnx.eval_shape(lambda: DiffTransformer(model_config(config), rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract)
    shardings = tree_shardings(shapes, make_mesh((1, -1, 1)), as_rules(config.sharding_rules))
    params = restore_params(directory, step, with_shardings(shapes, shardings))
    return LoadedModel(graphdef, params, step), config
