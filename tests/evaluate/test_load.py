import pickle
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

import diffjax
from diffjax.config import ConfigError
from diffjax.parallel.mesh import make_mesh
from diffjax.train.checkpoint import RunCheckpoints, run_metadata
from diffjax.train.state import create_state, make_trainer


def save_run(workdir: Path, steps: list[int], **model) -> dict[int, nnx.State]:
    """Checkpoints of a small model written by the training code's save path; returns the saved params."""
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64, **model)
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


def reference_logits(config, params: nnx.State, tokens: np.ndarray) -> np.ndarray:
    from diffjax.config import model_config
    from diffjax.model import DiffTransformer

    model = nnx.merge(nnx.graphdef(DiffTransformer(model_config(config), rngs=nnx.Rngs(0))), params)
    return np.asarray(model(jnp.asarray(tokens)).astype(jnp.float32))


def test_load_model_gives_the_saved_model_as_float32_logits(tmp_path):
    saved = save_run(tmp_path, [5, 10])
    model, config = diffjax.load_model(tmp_path)
    assert model.step == 10 and config.model.emb_dim == 32
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 259
    logits = model(tokens)
    assert logits.shape == (2, 12, 259) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference_logits(config, saved[10], tokens), rtol=1e-6, atol=1e-6)

    earlier, _ = diffjax.load_model(tmp_path, step=5)
    np.testing.assert_allclose(earlier(tokens), reference_logits(config, saved[5], tokens), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match=r"no checkpoint of step 7 .* holds steps \[5, 10\]"):
        diffjax.load_model(tmp_path, step=7)


def test_a_bfloat16_model_still_returns_float32_logits(tmp_path):
    save_run(tmp_path, [1], dtype="bfloat16")
    model, config = diffjax.load_model(tmp_path / "checkpoints" / "1")
    assert config.model.dtype == "bfloat16"
    assert model(np.ones((1, 4), np.int32)).dtype == jnp.float32


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_run(tmp_path, [3])

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    model, _ = diffjax.load_model(tmp_path)
    assert model.step == 3


def test_the_package_exports_only_load_model_lazily():
    assert diffjax.__all__ == ["load_model"]
    with pytest.raises(AttributeError):
        diffjax.not_a_thing  # noqa: B018
