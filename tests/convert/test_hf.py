"""Hugging Face export and import against the real `transformers` (DiffLlamaForCausalLM, LlamaForCausalLM).

Tolerances: float32 logits agree to 1e-4 (measured 1e-6 to 3e-6). bfloat16 exports are compared with
diffjax run in bfloat16 on the same bfloat16 weights. Both round at different points (HF's per-head norm
runs in bfloat16 and adds lambda_init in bfloat16), so on logits of magnitude 2-3 they differ by up to
0.08 (measured 0.02-0.08, mean 0.004-0.008): no more than either differs from the float32 model
(HF bfloat16 vs float32: 0.02-0.05). BF16_ATOL allows a little above that: 4-6 bfloat16 ulps at that size.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.convert.files import INDEX, read_safetensors
from diffjax.convert.hf import export_hf, import_hf
from diffjax.convert.layout import fold_subln_gain
from diffjax.convert.tokenizer import special_ids
from diffjax.data.tokenizer import ByteTokenizer

from .models import CASES, assert_same_params, case_config, greedy, logits, random_params, tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

F32_ATOL = 1e-4
BF16_ATOL = 0.1
BF16_MEAN_ATOL = 0.01


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's and XLA's CPU thread pools spin against each other on 2 cores (generate: 3 s instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export(directory, cfg, params, dtype="float32", max_shard_size="5GB"):
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"max_shard_size": max_shard_size, "max_positions": 64}
    export_hf(directory, params, cfg, dtype=dtype, special_ids=special_ids(ByteTokenizer()), **sizes)
    return directory


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def _hf_generate(model, prompts: np.ndarray, num_tokens: int) -> np.ndarray:
    """Greedy continuations of equal-length prompts (no padding), never stopping at an end-of-sequence id."""
    config = transformers.GenerationConfig(
        max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompts.astype(np.int64)), generation_config=config)
    return out[:, prompts.shape[1] :].numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, config, parameters, float32 export directory) of one tiny random model."""
    cfg = case_config(request.param)
    params = random_params(cfg)
    return request.param, cfg, params, _export(tmp_path_factory.mktemp(request.param), cfg, params)


def test_export_loads_in_transformers_with_the_same_logits_and_generations(case):
    name, cfg, params, directory = case
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert config["num_attention_heads"] == 2 * cfg.num_heads and config["head_dim"] == cfg.head_dim
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = "LlamaForCausalLM" if cfg.attention_type == "standard" else "DiffLlamaForCausalLM"
    assert type(model).__name__ == expected
    ids = tokens(cfg)
    difference = np.abs(_hf_logits(model, ids) - logits(cfg, params, ids)).max()
    print(f"{name}: float32 max abs logit difference {difference:.2e}")
    assert difference <= F32_ATOL

    prompts = ids[:, :4]  # 4 + 20 tokens: the shape the logits were compiled for
    np.testing.assert_array_equal(_hf_generate(model, prompts, 20), greedy(cfg, params, prompts, 20))


@pytest.mark.parametrize("name", ["gqa4_tied_gain", "standard_untied"])
def test_bfloat16_export_matches_diffjax_in_bfloat16(name, tmp_path):
    cfg = case_config(name)
    directory = _export(tmp_path, cfg, random_params(cfg), dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert model.dtype == torch.bfloat16
    imported_cfg, bf16_params = import_hf(directory)  # the bfloat16 weights, widened exactly to float32
    ids = tokens(cfg)
    difference = np.abs(
        _hf_logits(model, ids) - logits(dataclasses.replace(imported_cfg, dtype=jnp.bfloat16), bf16_params, ids)
    )
    print(f"{name}: bfloat16 max abs logit difference {difference.max():.2e}, mean {difference.mean():.2e}")
    assert difference.max() <= BF16_ATOL and difference.mean() <= BF16_MEAN_ATOL


def test_round_trip_through_hf_is_bit_exact(case, tmp_path):
    """import(export(x)) == x; with a per-head gain (which HF lacks) the import is the folded model, and
    exporting that again gives the same files."""
    _, cfg, params, directory = case
    imported_cfg, imported = import_hf(directory)
    assert not imported_cfg.subln_affine
    assert_same_params(imported, fold_subln_gain(params, cfg))
    if cfg.subln_affine:
        again = _export(tmp_path / "again", imported_cfg, imported)
        assert_same_params(read_safetensors(again), read_safetensors(directory))
        assert json.loads((again / "config.json").read_text()) == json.loads((directory / "config.json").read_text())
    else:
        assert imported_cfg == cfg


def test_a_large_export_is_sharded_with_an_index_that_transformers_reads(tmp_path):
    cfg = case_config("gqa2_untied_nogain")
    params = random_params(cfg)
    directory = _export(tmp_path / "sharded", cfg, params, max_shard_size="16KB")
    index = json.loads((directory / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (directory / "model.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokens(cfg)
    assert np.abs(_hf_logits(model, ids) - logits(cfg, params, ids)).max() <= F32_ATOL
    assert_same_params(import_hf(directory)[1], params)


def _randomise_norms(model) -> None:
    """transformers initialises RMSNorm weights to ones; other values catch a misplaced norm."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)


@pytest.mark.parametrize(
    ("model_class", "config_class", "extra"),
    [
        ("DiffLlamaForCausalLM", "DiffLlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
        ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ],
)
def test_import_of_a_transformers_initialised_model_matches_it(tmp_path, model_class, config_class, extra):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=80,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        **extra,
    )
    model = getattr(transformers, model_class)(config).eval()
    _randomise_norms(model)
    model.save_pretrained(tmp_path)
    cfg, params = import_hf(tmp_path)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (4, extra["num_key_value_heads"] // 2, 5000.0)
    ids = tokens(cfg)
    difference = np.abs(_hf_logits(model, ids) - logits(cfg, params, ids)).max()
    print(f"{model_class} import: float32 max abs logit difference {difference:.2e}")
    assert difference <= F32_ATOL
