"""diffjax parameters as the flat NumPy dict the layouts map (`blocks/attn/q_proj/kernel` -> array), and back.

The dict holds the model's real vocabulary only: the zero rows that pad the embedding and the LM head
(`ModelConfig.vocab_multiple`) are cut off here and put back by `to_state`, so no format ever sees them.
"""

import numpy as np
from flax import nnx, traverse_util

from diffjax.convert.layout import Params
from diffjax.model import VOCAB_AXES, DiffTransformer, ModelConfig
from diffjax.train.checkpoint import flat_leaves


def _abstract_state(cfg: ModelConfig) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: DiffTransformer(cfg, rngs=nnx.Rngs(0))))


def _vocab_rows(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    """`value` with `rows` entries along its vocabulary axis: padding cut off, or zeros appended."""
    if name not in VOCAB_AXES:
        return value
    axis = VOCAB_AXES[name]
    if value.shape[axis] >= rows:
        return value[(slice(None),) * axis + (slice(rows),)]
    padding = [(0, 0)] * value.ndim
    padding[axis] = (0, rows - value.shape[axis])
    return np.pad(value, padding)


def flat_params(state: nnx.State, cfg: ModelConfig) -> Params:
    """Host copies of a model's parameters (gathered from every device), keyed by path, without vocabulary padding."""
    return {name: _vocab_rows(name, np.asarray(value), cfg.vocab_size) for name, value in flat_leaves(state).items()}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of a model of `cfg` as `flat_params` gives it (nothing is allocated)."""
    shapes = {name: list(leaf.shape) for name, leaf in flat_leaves(_abstract_state(cfg)).items()}
    for name, axis in VOCAB_AXES.items():
        if name in shapes:
            shapes[name][axis] = cfg.vocab_size
    return {name: tuple(shape) for name, shape in shapes.items()}


def to_state(params: Params, cfg: ModelConfig) -> nnx.State:
    """The model's parameter state holding `params` (NumPy, cast to the parameter dtype, vocabulary padded)."""
    state = _abstract_state(cfg)
    dtype = np.dtype(cfg.param_dtype)
    flat = {
        tuple(name.split("/")): _vocab_rows(name, np.asarray(value, dtype), cfg.padded_vocab_size)
        for name, value in params.items()
    }
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return state
