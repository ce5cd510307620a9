import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REPO, load_config
from flax import nnx

from diffjax.config import model_config
from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.model import DiffTransformer
from diffjax.train.optimizer import make_optimizer
from diffjax.train.step import TrainState, eval_step, loss_and_count, train_step


def _tiny_config():
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=64, num_layers=2, mlp_dim=160)
    config.update(batch_size=4, seq_len=32, total_steps=300, warmup_steps=20, learning_rate=3e-3, weight_decay=0.0)
    return config


def test_a_tiny_model_overfits_a_fixed_batch():
    config = _tiny_config()
    rows, length = config.batch_size, config.seq_len
    tokens = ByteTokenizer().encode(python_docs("train")[0])[: rows * (length + 1)].reshape(rows, length + 1)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.broadcast_to(np.arange(length), (rows, length)),
        "loss_mask": np.ones((rows, length), np.float32),
    }
    graphdef, params = nnx.split(DiffTransformer(model_config(config), rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(config)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    losses = []
    for _ in range(config.total_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0, losses[0]  # ln(259) = 5.56 at init
    assert losses[-1] < 0.5, losses[-1]
    assert int(state.step) == config.total_steps


def test_loss_ignores_masked_targets_and_counts_kept_tokens(tiny_model_config):
    graphdef, params = nnx.split(DiffTransformer(tiny_model_config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 64, (2, 8))),
        "targets": jnp.asarray(rng.integers(0, 64, (2, 8))),
        "segment_ids": jnp.ones((2, 8), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
        "loss_mask": jnp.asarray(np.arange(16).reshape(2, 8) % 3 != 0, jnp.float32),
    }
    loss, count = loss_and_count(params, graphdef, batch)
    changed = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, batch["targets"], 0))
    np.testing.assert_allclose(loss_and_count(params, graphdef, changed)[0], loss, rtol=1e-6)
    assert float(count) == 10.0
    loss_sum, eval_count = eval_step(params, batch, graphdef=graphdef)
    np.testing.assert_allclose(loss_sum / eval_count, loss, rtol=1e-6)
