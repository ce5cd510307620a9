"""Analytic model FLOPs and chip peaks, for TFLOP/s and MFU (model FLOPs utilisation)."""

import jax

from diffjax.model.model_config import ModelConfig

# Dense bf16 peak TFLOP/s per device, by substring of `device.device_kind`.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6": 918.0,
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
}


# HBM per chip in GiB, by substring of `device.device_kind` (first match wins: "v5 lite" before "v5").
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6": 32}


def hbm_gib(device_kind: str) -> float:
    return next((gib for kind, gib in HBM_GIB.items() if kind in device_kind), float("nan"))


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul weights, plus causal attention scores and mixing.

    Differential attention: two branches of QK^T over d-wide heads and P V over 2d-wide values, 6 T E
    FLOPs per token and layer forward (the standard baseline and v2: 4 T E); causality halves it.
    """
    e, f, layers = cfg.emb_dim, cfg.mlp_dim, cfg.num_layers
    kv = 2 * cfg.num_kv_heads * cfg.head_dim if cfg.attention_type != "diff_v2" else cfg.num_kv_heads * cfg.head_dim
    out = e if cfg.attention_type != "diff_v2" else cfg.num_heads * cfg.head_dim
    extra = cfg.num_heads if cfg.attention_type == "diff_v2" else 0
    per_layer = e * e + 2 * e * kv + out * e + e * extra + 3 * e * f
    matmul_weights = layers * per_layer + cfg.padded_vocab_size * e  # the LM head as computed, padding included
    attention = {"diff": 6, "standard": 4, "diff_v2": 4}[cfg.attention_type] * seq_len * e * layers
    return 6.0 * matmul_weights + 3.0 * attention / 2


def peak_tflops(device: jax.Device, cpu_peak: float) -> float | None:
    """The device's dense bf16 peak, `cpu_peak` on CPU, None for a chip not in the table."""
    if device.platform == "cpu":
        return cpu_peak
    return next((peak for kind, peak in PEAK_TFLOPS.items() if kind in device.device_kind), None)
