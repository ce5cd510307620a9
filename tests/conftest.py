"""Shared fixtures: configs loaded the way train.py loads them, and a tiny model config."""

import importlib.util
import os
import socket
from pathlib import Path

import ml_collections
import pytest

from diffjax.model import ModelConfig

# libtpu (AOT compile tests) takes a machine-wide lock; tests and their subprocesses may load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Without a TPU, an installed libtpu would probe for one and print warnings into every CLI's stderr; the
# topology API used for AOT compilation works regardless. Set JAX_PLATFORMS explicitly to test on GPU/TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def load_config(path: Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config=path:arg` would give it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def free_port() -> int:
    """A localhost TCP port for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=64, emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
