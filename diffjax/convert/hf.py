"""Hugging Face directories: `DiffLlamaForCausalLM` (differential attention v1) and `LlamaForCausalLM` (baseline).

`config.json` is plain JSON written and read here, so neither direction needs torch or transformers;
`DiffLlamaForCausalLM.from_pretrained(dir)` (or `Llama...`) loads the result. transformers has no
Differential Transformer V2 class: V2 exports only to the Microsoft layout.
"""

from typing import Any

import numpy as np
from etils import epath

from diffjax.convert.files import DTYPES, read_json, read_safetensors, write_json, write_safetensors
from diffjax.convert.layout import ConversionError, Params, fold_subln_gain, hf_layout
from diffjax.convert.params import param_shapes
from diffjax.model import ModelConfig

# attention type -> (model_type, architecture)
ARCHITECTURES = {"diff": ("diffllama", "DiffLlamaForCausalLM"), "standard": ("llama", "LlamaForCausalLM")}
MODEL_TYPES = {model_type: attention for attention, (model_type, _) in ARCHITECTURES.items()}
DEFAULT_ROPE_THETA = 10_000.0


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", max_position_embeddings: int = 2048) -> dict[str, Any]:
    """`config.json` of the same network: Hugging Face counts 2H heads of width d where diffjax counts H.

    RoPE theta is written both ways: top-level `rope_theta` (transformers 4.x) and `rope_parameters` (5.x);
    likewise the dtype as `torch_dtype` (4.x) and `dtype` (5.x). Token ids are diffjax's tokenizers'.
    """
    if cfg.attention_type not in ARCHITECTURES:
        raise ConversionError(
            f"transformers has no class for attention_type={cfg.attention_type!r} (no Differential Transformer V2); "
            "export it with --format=microsoft"
        )
    model_type, architecture = ARCHITECTURES[cfg.attention_type]
    values = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": 2 * cfg.num_heads,
        "num_key_value_heads": 2 * cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.init_std,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "torch_dtype": dtype,
        "dtype": dtype,
        "pad_token_id": 0,  # the byte tokenizer's; export_hf writes the run's tokenizer's
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }
    if cfg.attention_type == "diff":
        values["lambda_std_dev"] = cfg.lambda_std_dev
    else:
        values |= {"mlp_bias": False, "pretraining_tp": 1}
    return values


def _rope_theta(values: dict[str, Any]) -> float:
    """Theta from `rope_parameters` (5.x) or `rope_theta` (4.x); only the plain RoPE diffjax implements."""
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConversionError(f"rope_type={kind!r} is not supported; diffjax implements the default RoPE only")
    return float(rope.get("rope_theta", values.get("rope_theta", DEFAULT_ROPE_THETA)))


def model_config_from_hf(values: dict[str, Any]) -> ModelConfig:
    """The diffjax model of a Hugging Face `config.json`, or one line saying why there is none."""
    try:
        return _model_config(values)
    except KeyError as error:
        raise ConversionError(f"config.json lacks the field {error}") from None


def _model_config(values: dict[str, Any]) -> ModelConfig:
    model_type = values.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"model_type={model_type!r} is not supported; diffjax imports {', '.join(sorted(MODEL_TYPES))}"
        )
    heads = values["num_attention_heads"]
    kv_heads = values.get("num_key_value_heads") or heads
    hidden = values["hidden_size"]
    if kv_heads % 2:
        raise ConversionError(
            f"num_key_value_heads={kv_heads} is odd; diffjax has 2 key/value heads per pair "
            + ("(Hugging Face DiffLlama requires an even count too)" if model_type == "diffllama" else "")
        )
    if heads % 2 or heads % kv_heads:
        raise ConversionError(
            f"num_attention_heads={heads} must be even and a multiple of num_key_value_heads={kv_heads}"
        )
    head_dim = values.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(
            f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; diffjax's heads split "
            "the model width exactly"
        )
    for key, wanted in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
        if values.get(key, wanted) != wanted:
            raise ConversionError(f"{key}={values[key]!r} is not supported; diffjax has {key}={wanted!r}")
    return ModelConfig(
        vocab_size=values["vocab_size"],
        emb_dim=hidden,
        num_layers=values["num_hidden_layers"],
        num_heads=heads // 2,
        num_kv_heads=kv_heads // 2,
        mlp_dim=values["intermediate_size"],
        attention_type=MODEL_TYPES[model_type],
        tie_embeddings=bool(values.get("tie_word_embeddings", False)),
        subln_affine=False,  # Hugging Face's per-head norm has no gain
        rope_theta=_rope_theta(values),
        rms_norm_eps=float(values.get("rms_norm_eps", 1e-6)),
        lambda_std_dev=float(values.get("lambda_std_dev") or 0.1),
        init_std=float(values.get("initializer_range", 0.02)),
    )


def export_hf(
    directory: epath.Path,
    params: Params,
    cfg: ModelConfig,
    *,
    dtype: str,
    max_shard_size: int | str,
    max_positions: int,
    special_ids: dict[str, int],
) -> None:
    """`config.json` (with the tokenizer's `special_ids`) and `model.safetensors` (sharded above
    `max_shard_size`), the per-head gain folded in."""
    values = hf_config(cfg, dtype=dtype, max_position_embeddings=max_positions) | special_ids
    tensors = hf_layout(cfg).to_external(fold_subln_gain(params, cfg))
    write_safetensors(directory, {name: value.astype(DTYPES[dtype]) for name, value in tensors.items()}, max_shard_size)
    write_json(directory / "config.json", values)


def import_hf(directory: epath.Path) -> tuple[ModelConfig, Params]:
    """The diffjax model config and float32 parameters of a Hugging Face DiffLlama or Llama directory."""
    cfg = model_config_from_hf(read_json(directory / "config.json"))
    tensors = {
        name: value.astype(np.float32)
        for name, value in read_safetensors(directory).items()
        if not name.endswith("rotary_emb.inv_freq")  # a buffer older transformers saved; recomputed from theta
    }
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some writers store the tied copy
    return cfg, hf_layout(cfg).from_external(tensors, param_shapes(cfg))
