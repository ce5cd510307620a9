"""Run a few train steps of a small config on several meshes in one process (invoked by the tests).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel/sharded_run.py OUT.json

Prints nothing; writes {mesh: {"losses": [...], "shardings": {param: spec}}} for each mesh.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import REPO, load_config

from diffjax.parallel.mesh import make_mesh
from diffjax.train.state import create_state, global_batch, make_trainer

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]
STEPS = 5


def small_config():
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=64, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=128, vocab_size=260)
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


def train(config, mesh) -> dict:
    trainer = make_trainer(config, mesh)
    state = create_state(config, trainer)
    losses = []
    for batch in batches(config, STEPS):
        state, metrics = trainer.train_step(state, global_batch(batch, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    specs = {
        jax.tree_util.keystr(path): str(leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    return {"losses": losses, "shardings": specs}


def main(out: str) -> None:
    config = small_config()
    results = {}
    for shape in MESHES:
        devices = jax.devices()[: int(np.prod(shape))]
        results[str(shape)] = train(config, make_mesh(shape, devices=devices))
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
