"""Training-step throughput: full jitted steps (forward, backward, AdamW) of diffjax on a synthetic batch.

The model is built from `base_config()` with the benchmark's shape, so the step timed is exactly the one
`train.py` runs (same trainer, optimizer, gradient clipping and NaN guard). The batch is random tokens:
throughput does not depend on the text.
"""

import math
import resource
import statistics
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from diffjax.config import base_config, validate
from diffjax.parallel.mesh import make_mesh
from diffjax.train.state import create_state, global_batch, make_trainer


class Shape(NamedTuple):
    """Model and batch of a benchmark, in the flags' (paper) terms: `num_heads` is H differential heads."""

    emb_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int
    dtype: str = "float32"
    attention_impl: str = "auto"
    scan_layers: bool = True
    remat_policy: str = "none"


def bench_config(shape: Shape) -> ml_collections.ConfigDict:
    """The validated training config of `shape` (a bad value raises `ConfigError` naming it)."""
    config = base_config()
    config.seq_len, config.batch_size = shape.seq_len, shape.batch_size
    config.model.update(
        emb_dim=shape.emb_dim,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        mlp_dim=shape.mlp_dim,
        vocab_size=shape.vocab_size,
        dtype=shape.dtype,
        attention_impl=shape.attention_impl,
        scan_layers=shape.scan_layers,
        remat_policy=shape.remat_policy,
    )
    validate(config)
    return config


def data_parallel_devices(batch_size: int) -> int:
    """Devices along the mesh's `data` axis: as many as divide the batch (every device gets whole rows)."""
    return math.gcd(batch_size, jax.device_count())


def random_tokens(config: ml_collections.ConfigDict, seed: int = 0) -> np.ndarray:
    """`[B, T + 1]` token ids: inputs are the first T, next-token targets the last T."""
    shape = (config.batch_size, config.seq_len + 1)
    return np.random.default_rng(seed).integers(0, config.model.vocab_size, shape)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diffjax_step(shape: Shape) -> Callable[[], None]:
    """A closure running one diffjax training step of `shape`, data-parallel over the devices that divide
    the batch, blocking until it is done."""
    config = bench_config(shape)
    config.mesh.shape = (data_parallel_devices(shape.batch_size), 1, 1)
    return compiled_step(config, jax.devices()[: config.mesh.shape[0]])[0]


def compiled_step(
    config: ml_collections.ConfigDict, devices: list[jax.Device]
) -> tuple[Callable[[], float], jax.stages.Compiled]:
    """`config`'s training step on a fixed random batch over `devices` (mesh `config.mesh.shape`), compiled
    once: a closure that runs a step and returns its loss once it is done, and the compiled step (its memory
    analysis). Out-of-memory surfaces here, from the compiler, or at the closure's first call."""
    trainer = make_trainer(config, make_mesh(config.mesh.shape, devices=devices))
    tokens = random_tokens(config)
    rows = np.ones((config.batch_size, config.seq_len), np.int32)
    local = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": np.broadcast_to(np.arange(config.seq_len, dtype=np.int32), rows.shape).copy(),
        "segment_ids": rows,
        "loss_mask": rows,
    }
    batch = global_batch(local, trainer.batch_sharding)
    state = create_state(config, trainer)
    compiled = trainer.train_step.lower(state, batch).compile()

    def step() -> float:
        nonlocal state
        state, metrics = compiled(state, batch)
        return float(metrics["loss"])

    return step, compiled


def median_tokens_per_s(seconds: list[float], shape: Shape) -> float:
    return shape.batch_size * shape.seq_len / statistics.median(seconds)
