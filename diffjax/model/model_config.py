"""Typed model hyperparameters: what the modules receive (built from a ConfigDict by diffjax.config)."""

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

AttentionType = Literal["diff", "diff_v2", "standard"]
RematPolicy = Literal["none", "minimal", "full", "save_attention"]
AttentionImpl = Literal["auto", "reference", "blockwise", "pallas"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics.

    `num_heads` is H, the number of *differential* heads (paper units): every attention type uses
    2H query heads of width `head_dim = emb_dim / (2H)`, so switching `attention_type` to
    `standard` gives the paper's matched baseline with the same parameter count.
    """

    vocab_size: int
    emb_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    attention_type: AttentionType = "diff"
    tie_embeddings: bool = True
    subln_affine: bool = True
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    lambda_std_dev: float = 0.1
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: RematPolicy = "none"
    # False unrolls the layer loop: no per-layer slicing of the stacked weights and stacking of residuals and
    # gradients (about 15% of a small model's CPU step), at the price of compile time growing with depth.
    scan_layers: bool = True
    attention_impl: AttentionImpl = "auto"  # the attention core (diffjax.ops.dispatch)
    attention_block_q: int = 0  # query/key tile sizes of the attention core (0: its default)
    attention_block_k: int = 0
    # Embedding and LM-head rows: vocab_size rounded up to a multiple of this. The extra rows stay zero and
    # their logits are masked, so they change nothing but shapes (1: none; train.py's configs use 128).
    vocab_multiple: int = 1

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: `vocab_size` rounded up to a multiple of `vocab_multiple`."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        """Query/key sub-head width d (values are 2d wide in differential attention v1)."""
        return self.emb_dim // (2 * self.num_heads)

    @property
    def kv_groups(self) -> int:
        """Differential heads sharing one key/value head (GQA `n_rep`)."""
        return self.num_heads // self.num_kv_heads

    def lambda_inits(self) -> np.ndarray:
        """lambda_init(l) = 0.8 - 0.6 exp(-0.3 l) per 0-based layer, computed in float64 like HF's Python floats."""
        layers = np.arange(self.num_layers, dtype=np.float64)
        return 0.8 - 0.6 * np.exp(-0.3 * layers)
