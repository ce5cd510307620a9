import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.model import DiffTransformer
from diffjax.parallel.mesh import make_mesh
from diffjax.train.state import create_state, make_trainer
from diffjax.train.step import loss_and_count, loss_sums


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
    trainer = make_trainer(config, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state = create_state(config, trainer)
    losses = []
    for _ in range(config.total_steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0, losses[0]  # ln(259) = 5.56 at init
    assert losses[-1] < 0.5, losses[-1]
    assert int(state.step) == config.total_steps


@functools.cache
def _packed_trajectory(attention_impl: str, dtype: str, steps: int = 5) -> np.ndarray:
    """(loss, gradient norm) of `steps` AdamW steps of a small GQA model on packed rows of two documents each,
    72 tokens in 32-token tiles (so neither core sees the sequence in one tile, nor a whole last tile)."""
    rows, length = 4, 72
    tokens = ByteTokenizer().encode(python_docs("train")[1])[: rows * (length + 1)].reshape(rows, length + 1)
    split = np.arange(length) >= 24 + 8 * np.arange(rows)[:, None]  # the second document starts at 24, 32, ...
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": 1 + split.astype(np.int32),
        "positions": np.where(split, np.arange(length) - np.argmax(split, axis=1)[:, None], np.arange(length)),
        "loss_mask": np.ones((rows, length), np.float32),
    }
    config = _tiny_config()
    config.update(batch_size=rows, seq_len=length, warmup_steps=0)
    config.model.update(num_heads=4, num_kv_heads=2, dtype=dtype, attention_impl=attention_impl)
    if jax.default_backend() != "tpu":  # TPU kernels take 128-wide tiles at least: there, the defaults
        config.model.update(attention_block_q=32, attention_block_k=32)
    trainer = make_trainer(config, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state = create_state(config, trainer)
    values = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
        values.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(values)


@pytest.mark.slow
@pytest.mark.accelerator
@pytest.mark.parametrize(("impl", "dtype"), [("auto", "float32"), ("pallas", "float32"), ("auto", "bfloat16")])
def test_train_steps_with_a_fast_core_follow_the_reference_core(impl, dtype):
    """The losses and gradient norms with `impl` (on a GPU `auto` is the fused kernel, on CPU blockwise;
    `pallas` runs interpreted on CPU) follow `attention_impl=reference` step by step. Measured on CPU: 9e-8
    relative in float32, 1.2e-3 in bfloat16 (the gradient norm)."""
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(_packed_trajectory(impl, dtype), _packed_trajectory("reference", dtype), rtol=tolerance)


def test_a_padded_vocabulary_trains_like_an_unpadded_one():
    """10 AdamW steps with weight decay: the same losses and norms, and the padding rows stay exactly zero."""
    trajectories, embeddings = {}, {}
    for multiple in (1, 128):
        config = _tiny_config()
        config.update(weight_decay=0.1, total_steps=10, warmup_steps=2)
        config.model.update(vocab_multiple=multiple, tie_embeddings=False)
        trainer = make_trainer(config, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
        state = create_state(config, trainer)
        rng = np.random.default_rng(0)
        values = []
        for _ in range(config.total_steps):
            tokens = rng.integers(0, 259, (config.batch_size, config.seq_len + 1)).astype(np.int32)
            batch = {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": np.ones((config.batch_size, config.seq_len), np.int32),
                "positions": np.broadcast_to(np.arange(config.seq_len), (config.batch_size, config.seq_len)),
                "loss_mask": np.ones((config.batch_size, config.seq_len), np.float32),
            }
            state, metrics = trainer.train_step(state, batch)
            values.append([float(metrics[key]) for key in ("loss", "grad_norm", "param_norm")])
        trajectories[multiple] = np.array(values)
        embeddings[multiple] = (
            np.asarray(state.params["embed"]["embedding"]),
            np.asarray(state.params["lm_head"]["kernel"]),
        )
    np.testing.assert_allclose(trajectories[128], trajectories[1], rtol=1e-6)
    embedding, head = embeddings[128]
    assert embedding.shape == (384, 64) and not np.any(embedding[259:]) and not np.any(head[:, 259:])
    np.testing.assert_allclose(embedding[:259], embeddings[1][0], rtol=0, atol=1e-6)  # |values| ~ 0.02


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
    loss_sum, eval_count = loss_sums(params, graphdef, batch)[1]
    np.testing.assert_allclose(loss_sum / eval_count, loss, rtol=1e-6)
