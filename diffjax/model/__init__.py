"""Flax NNX modules of the Differential Transformer and its baselines."""

from diffjax.model.model_config import ModelConfig
from diffjax.model.transformer import DiffTransformer

__all__ = ["DiffTransformer", "ModelConfig"]
