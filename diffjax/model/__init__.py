"""Flax NNX modules of the Differential Transformer and its baselines."""

from diffjax.model.model_config import ModelConfig
from diffjax.model.transformer import DiffTransformer, parameter_count

__all__ = ["DiffTransformer", "ModelConfig", "parameter_count"]
