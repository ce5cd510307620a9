"""Flax NNX modules of the Differential Transformer and its baselines."""

from diffjax.model.model_config import ModelConfig
from diffjax.model.transformer import VOCAB_AXES, DiffTransformer, parameter_count

__all__ = ["VOCAB_AXES", "DiffTransformer", "ModelConfig", "parameter_count"]
