import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

from diffjax.config import validate
from diffjax.model import DiffTransformer
from diffjax.train.optimizer import learning_rate_schedule, make_optimizer, warmup_note, weight_decay_mask


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_the_end_value(schedule):
    config = load_config(REPO / "configs" / "tiny.py")
    config.update(total_steps=100, warmup_steps=10, learning_rate=1e-3, end_learning_rate=1e-4, lr_schedule=schedule)
    lr = learning_rate_schedule(config)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(100)], [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-5)
    assert lr(50) < lr(20) < lr(10)
    midpoint = 5.5e-4 if schedule == "linear" else 1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * 0.5))
    np.testing.assert_allclose(lr(55), midpoint, rtol=1e-4)


def test_a_run_shorter_than_its_warmup_warms_up_over_all_its_steps_and_says_so():
    config = load_config(REPO / "configs" / "tiny.py")  # warmup_steps=40
    assert warmup_note(config) is None
    config.update(total_steps=5, learning_rate=1e-3)
    validate(config)  # a five-step smoke run is accepted
    assert warmup_note(config) == "warmup_steps=40 exceeds total_steps=5: warming up over all 5 steps"
    lr = learning_rate_schedule(config)
    np.testing.assert_allclose([lr(step) for step in range(6)], [0.0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-5)


def test_weight_decay_skips_norm_gains_and_lambda_vectors(tiny_model_config):
    params = nnx.state(DiffTransformer(tiny_model_config, rngs=nnx.Rngs(0)), nnx.Param)
    flat_mask = jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]
    decayed = {jax.tree_util.keystr(path): flag for path, flag in flat_mask}
    assert decayed and all(flag == ("kernel" in name or "embedding" in name) for name, flag in decayed.items())
    assert any("lambda_q1" in name for name in decayed) and any("scale" in name for name in decayed)

    # With zero gradients only decay moves a parameter: kernels shrink, gains and lambdas stay.
    config = load_config(REPO / "configs" / "tiny.py")
    config.update(warmup_steps=0, weight_decay=0.5)
    optimizer = make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    for (path, update), (_, flag) in zip(jax.tree_util.tree_flatten_with_path(updates)[0], flat_mask, strict=True):
        assert bool(np.any(np.asarray(update) != 0)) == flag, jax.tree_util.keystr(path)
