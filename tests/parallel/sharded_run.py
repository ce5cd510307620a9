"""Run a few train steps of a small config on several meshes (invoked by the tests).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel/sharded_run.py OUT.json
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/parallel/sharded_run.py OUT.json PROCESS PORT

The first form writes {mesh: {"losses": [...], "shardings": {param: spec}}} for each mesh; the second joins a
two-process run on localhost (this is process PROCESS of 2) over a (1, 4, 1) mesh, and process 0 writes
{"losses": [...]}. Every process feeds only its own rows of each global batch.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import REPO, load_config

from diffjax.parallel.mesh import initialize_distributed, make_mesh
from diffjax.train.state import create_state, global_batch, make_trainer

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]
STEPS = 5


def small_config():
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=64, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=128, vocab_size=259)
    config.update(batch_size=8, seq_len=32, warmup_steps=1, total_steps=STEPS)
    return config


def batches(config, count):
    rng = np.random.default_rng(0)
    for _ in range(count):
        tokens = rng.integers(3, 259, size=(config.batch_size, config.seq_len + 1)).astype(np.int32)
        segments = np.ones((config.batch_size, config.seq_len), np.int32)
        segments[:, config.seq_len // 2 :] = 2
        positions = np.concatenate([np.arange(config.seq_len // 2)] * 2).astype(np.int32)
        yield {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segments,
            "positions": np.broadcast_to(positions, segments.shape).copy(),
            "loss_mask": np.ones(segments.shape, np.float32),
        }


def train(config, mesh, steps: int = STEPS) -> dict:
    trainer = make_trainer(config, mesh)
    state = create_state(config, trainer)
    rows = config.batch_size // jax.process_count()
    own = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for batch in batches(config, steps):
        local = {key: value[own] for key, value in batch.items()}
        state, metrics = trainer.train_step(state, global_batch(local, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    specs = {
        jax.tree_util.keystr(path): str(leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    return {"losses": losses, "shardings": specs}


def single_process(out: str) -> None:
    config = small_config()
    results = {}
    for shape in MESHES:
        devices = jax.devices()[: int(np.prod(shape))]
        results[str(shape)] = train(config, make_mesh(shape, devices=devices))
    Path(out).write_text(json.dumps(results))


def two_processes(out: str, process_id: int, port: int) -> None:
    initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, timeout_s=120)
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    result = train(small_config(), make_mesh((1, 4, 1)), steps=3)
    if process_id == 0:
        Path(out).write_text(json.dumps({"losses": result["losses"]}))


if __name__ == "__main__":
    if len(sys.argv) == 2:
        single_process(sys.argv[1])
    else:
        two_processes(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
