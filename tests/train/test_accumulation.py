import functools

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

from diffjax.parallel.mesh import make_mesh
from diffjax.train.state import create_state, global_batch, make_trainer
from diffjax.train.step import mean_gradients


def _config(accum: int):
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=32, num_layers=2, mlp_dim=64)
    config.update(batch_size=16, seq_len=16, warmup_steps=0, grad_accum_steps=accum)
    return config


def _batch(config):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(config.batch_size, config.seq_len + 1)).astype(np.int32)
    mask = (rng.random((config.batch_size, config.seq_len)) > 0.3).astype(np.float32)  # uneven counts per row
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((config.batch_size, config.seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(config.seq_len), (config.batch_size, config.seq_len)).copy(),
        "loss_mask": mask,
    }


def _trainer(config):
    return make_trainer(config, make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def _one_step(config):
    trainer = _trainer(config)
    batch = global_batch(_batch(config), trainer.batch_sharding)
    return trainer.train_step(create_state(config, trainer), batch)


def _gradients(config):
    trainer = _trainer(config)
    params = create_state(config, trainer).params
    return jax.jit(functools.partial(mean_gradients, options=trainer.options))(params, _batch(config))


@pytest.mark.slow
def test_four_micro_batches_equal_one_batch_four_times_larger():
    whole_grads, whole_loss, whole_count = _gradients(_config(1))
    accum_grads, accum_loss, accum_count = _gradients(_config(4))
    assert float(accum_count) == float(whole_count)
    np.testing.assert_allclose(float(accum_loss), float(whole_loss), rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(whole_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), accum_grads, whole_grads)


@pytest.mark.slow
def test_z_loss_adds_to_the_objective_not_the_reported_loss():
    config = _config(1)
    _, plain = _one_step(config)
    config.z_loss = 1e-2
    _, with_z = _one_step(config)
    np.testing.assert_allclose(float(with_z["loss"]), float(plain["loss"]), rtol=1e-6)
    assert float(with_z["grad_norm"]) != float(plain["grad_norm"])


def test_a_non_finite_step_leaves_the_last_good_state():
    config = _config(1)
    config.update(learning_rate=1e30, end_learning_rate=0.0, grad_clip_norm=1e30)  # step 1 blows the weights up
    trainer = _trainer(config)
    batch = global_batch(_batch(config), trainer.batch_sharding)
    state, first = trainer.train_step(create_state(config, trainer), batch)
    assert bool(first["finite"])
    good = jax.device_get(state.params)
    state, second = trainer.train_step(state, batch)
    assert not bool(second["finite"]) and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), good)
