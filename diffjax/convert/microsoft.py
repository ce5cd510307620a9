"""The official Microsoft layout (microsoft/unilm `Diff-Transformer`): v1, V2 and V2's baseline mode.

`model.safetensors` holds the whole decoder; the tensors under `layers.{i}.attention.` are exactly the
state dict of the official attention module (`MultiheadFlashDiff1` for v1, `MultiheadFlashDiffV2` for
V2 and, with `use_diff_v2=False`, the standard baseline), and `args.json` holds its constructor
arguments and the decoder's (`depth` is the layer index). Per SPEC section 2: interleaved sub-heads,
interleaved (GPT-J) RoPE rows, `subln.weight` separate (all ones for a model without the gain, which
`args.json` records so import drops it again).
"""

from typing import Any

import numpy as np
from etils import epath

from diffjax.convert.files import DTYPES, read_json, read_safetensors, write_json, write_safetensors
from diffjax.convert.layout import SUBLN, ConversionError, Params, microsoft_layout
from diffjax.convert.params import param_shapes
from diffjax.model import ModelConfig

ARGS = "args.json"
FORMAT = "microsoft-diff-transformer"


def microsoft_args(cfg: ModelConfig) -> dict[str, Any]:
    """Constructor arguments of the attention module and of the decoder around it."""
    if cfg.attention_type == "diff":
        attention = {
            "class": "MultiheadFlashDiff1",
            "embed_dim": cfg.emb_dim,
            "num_heads": cfg.num_heads,
            "depth": "the layer index, 0-based",
            "args": {"decoder_kv_attention_heads": cfg.num_kv_heads, "model_parallel_size": 1},
            "subln_eps": cfg.rms_norm_eps,
            "subln_elementwise_affine": cfg.subln_affine,
            "lambda_std_dev": cfg.lambda_std_dev,
        }
    else:
        v2 = cfg.attention_type == "diff_v2"
        attention = {
            "class": "MultiheadFlashDiffV2",
            "use_diff_v2": v2,
            "d_model": cfg.emb_dim,
            "num_heads": cfg.num_heads if v2 else 2 * cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads if v2 else 2 * cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
        }
    decoder = {
        "dim": cfg.emb_dim,
        "n_layers": cfg.num_layers,
        "hidden_dim": cfg.mlp_dim,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_interleaved": True,
        "tie_embeddings": cfg.tie_embeddings,
        "init_std": cfg.init_std,
    }
    return {"format": FORMAT, "attention": attention, "decoder": decoder}


def model_config_from_microsoft(args: dict[str, Any]) -> ModelConfig:
    if args.get("format") != FORMAT:
        raise ConversionError(f"{ARGS} is not a {FORMAT} description (format={args.get('format')!r})")
    try:
        return _model_config(args["attention"], args["decoder"])
    except KeyError as error:
        raise ConversionError(f"{ARGS} lacks the field {error}") from None


def _model_config(attention: dict[str, Any], decoder: dict[str, Any]) -> ModelConfig:
    common = dict(
        vocab_size=decoder["vocab_size"],
        emb_dim=decoder["dim"],
        num_layers=decoder["n_layers"],
        mlp_dim=decoder["hidden_dim"],
        tie_embeddings=decoder["tie_embeddings"],
        rope_theta=decoder["rope_theta"],
        rms_norm_eps=decoder["norm_eps"],
        init_std=decoder["init_std"],
    )
    if attention["class"] == "MultiheadFlashDiff1":
        return ModelConfig(
            num_heads=attention["num_heads"],
            num_kv_heads=attention["args"]["decoder_kv_attention_heads"] or attention["num_heads"],
            attention_type="diff",
            subln_affine=attention["subln_elementwise_affine"],
            lambda_std_dev=attention["lambda_std_dev"],
            **common,
        )
    if attention["class"] != "MultiheadFlashDiffV2":
        raise ConversionError(f"attention class {attention['class']!r} is not supported")
    if attention["use_diff_v2"]:
        return ModelConfig(
            num_heads=attention["num_heads"], num_kv_heads=attention["num_kv_heads"], attention_type="diff_v2", **common
        )
    if attention["num_heads"] % 2 or attention["num_kv_heads"] % 2:
        raise ConversionError("a baseline needs even num_heads and num_kv_heads (diffjax counts them in pairs)")
    return ModelConfig(
        num_heads=attention["num_heads"] // 2,
        num_kv_heads=attention["num_kv_heads"] // 2,
        attention_type="standard",
        **common,
    )


def export_microsoft(
    directory: epath.Path, params: Params, cfg: ModelConfig, *, dtype: str, max_shard_size: int | str
) -> None:
    if cfg.attention_type == "diff" and not cfg.subln_affine:
        params = params | {SUBLN: np.ones((cfg.num_layers, 2 * cfg.head_dim), np.float32)}  # the official gain
    tensors = microsoft_layout(cfg).to_external(params)
    write_safetensors(directory, {name: value.astype(DTYPES[dtype]) for name, value in tensors.items()}, max_shard_size)
    write_json(directory / ARGS, microsoft_args(cfg))


def import_microsoft(directory: epath.Path) -> tuple[ModelConfig, Params]:
    cfg = model_config_from_microsoft(read_json(directory / ARGS))
    tensors = {name: value.astype(np.float32) for name, value in read_safetensors(directory).items()}
    shapes = param_shapes(cfg)
    ones_gain = cfg.attention_type == "diff" and not cfg.subln_affine
    if ones_gain:
        shapes[SUBLN] = (cfg.num_layers, 2 * cfg.head_dim)
    params = microsoft_layout(cfg).from_external(tensors, shapes)
    if ones_gain and not np.all(params.pop(SUBLN) == 1):
        raise ConversionError(f"{ARGS} says the model has no subln gain, but subln.weight is not all ones")
    return cfg, params
