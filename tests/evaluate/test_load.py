import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_run
from flax import nnx

import diffjax
from diffjax.config import ConfigError


def reference_logits(config, params: nnx.State, tokens: np.ndarray) -> np.ndarray:
    from diffjax.config import model_config
    from diffjax.model import DiffTransformer

    cfg = model_config(config)
    model = nnx.merge(nnx.graphdef(DiffTransformer(cfg, rngs=nnx.Rngs(0))), params)
    return np.asarray(model(jnp.asarray(tokens))[..., : cfg.vocab_size].astype(jnp.float32))


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


def test_a_run_from_before_vocabulary_padding_still_loads(tmp_path):
    """Its config has no model.vocab_multiple and its embedding 259 rows: it loads unpadded."""
    saved = save_run(tmp_path, [1], model={"vocab_multiple": 1})
    metadata_file = tmp_path / "checkpoints" / "1" / "metadata" / "metadata"
    metadata = json.loads(metadata_file.read_text())
    del metadata["config"]["model"]["vocab_multiple"]
    metadata_file.write_text(json.dumps(metadata))
    model, config = diffjax.load_model(tmp_path)
    assert "vocab_multiple" not in config.model and model.params["embed"]["embedding"].shape == (259, 32)
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
    np.testing.assert_allclose(model(tokens), reference_logits(config, saved[1], tokens), rtol=1e-6, atol=1e-6)


def test_a_bfloat16_model_still_returns_float32_logits(tmp_path):
    save_run(tmp_path, [1], model={"dtype": "bfloat16"})
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
