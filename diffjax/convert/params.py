"""diffjax parameters as the flat NumPy dict the layouts map (`blocks/attn/q_proj/kernel` -> array), and back."""

import numpy as np
from flax import nnx, traverse_util

from diffjax.convert.layout import Params
from diffjax.model import DiffTransformer, ModelConfig
from diffjax.train.checkpoint import flat_leaves


def _abstract_state(cfg: ModelConfig) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: DiffTransformer(cfg, rngs=nnx.Rngs(0))))


def flat_params(state: nnx.State) -> Params:
    """Host copies of a model's parameters (gathered from every device), keyed by path."""
    return {name: np.asarray(value) for name, value in flat_leaves(state).items()}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of a model of `cfg` (nothing is allocated)."""
    return {name: tuple(leaf.shape) for name, leaf in flat_leaves(_abstract_state(cfg)).items()}


def to_state(params: Params, cfg: ModelConfig) -> nnx.State:
    """The model's parameter state holding `params` (NumPy, cast to the parameter dtype)."""
    state = _abstract_state(cfg)
    dtype = np.dtype(cfg.param_dtype)
    flat = {tuple(name.split("/")): np.asarray(value, dtype) for name, value in params.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return state
