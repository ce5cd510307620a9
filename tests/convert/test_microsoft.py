"""The Microsoft layout: an independent NumPy forward pass of the official modules reads the export.

The reference is written from microsoft/unilm `Diff-Transformer` (`MultiheadFlashDiff1`,
`MultiheadFlashDiffV2`) and the YOCO decoder around them, in float64, straight from the exported names
and `args.json`: interleaved sub-heads (pair p = sub-heads 2p, 2p+1), values viewed as (Hkv, 2d),
interleaved (GPT-J) RoPE, `subln.weight`. Nothing here imports the conversion's layout code.
"""

import dataclasses
import json

import numpy as np
import pytest

from diffjax.convert.microsoft import ARGS, export_microsoft, import_microsoft

from .models import assert_same_params, case_config, logits, random_params, tokens

safetensors_numpy = pytest.importorskip("safetensors.numpy")

CASES = ["mha_tied_gain", "gqa2_untied_nogain", "gqa4_tied_gain", "standard_untied", "v2_gqa", "untied_padded"]


def _config(name: str):
    if name == "v2_gqa":  # 4 query heads over 1 key/value head
        return case_config("mha_tied_gain", attention_type="diff_v2", num_kv_heads=1, tie_embeddings=False)
    if name == "untied_padded":  # 96 vocabulary rows padded to 128: the padding is in no format
        return case_config("gqa2_untied_nogain", vocab_multiple=128)
    return case_config(name)


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed if weight is None else normed * weight


def rope_interleaved(x: np.ndarray, theta: float) -> np.ndarray:
    """GPT-J rotary embedding of `x` `[B, T, N, d]`: channels (2i, 2i+1) rotate at frequency i."""
    width = x.shape[-1]
    angles = np.arange(x.shape[1])[:, None] / theta ** (np.arange(0, width, 2) / width)  # [T, d/2]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def causal_attention(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) with a causal mask, one head: `[B, T, d] x [B, T, d] -> [B, T, T]`."""
    scores = np.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones(scores.shape[1:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def flash_diff_1(x, w, attention: dict, depth: int, theta: float) -> np.ndarray:
    """`MultiheadFlashDiff1.forward` (flash_attn's GQA: query head p reads key/value head p // n_rep)."""
    batch, length, embed = x.shape
    heads, kv_heads = attention["num_heads"], attention["args"]["decoder_kv_attention_heads"]
    d = embed // heads // 2
    q = rope_interleaved((x @ w["q_proj.weight"].T).reshape(batch, length, 2 * heads, d), theta)
    k = rope_interleaved((x @ w["k_proj.weight"].T).reshape(batch, length, 2 * kv_heads, d), theta)
    v = (x @ w["v_proj.weight"].T).reshape(batch, length, kv_heads, 2 * d)
    q, k = q.reshape(batch, length, heads, 2, d), k.reshape(batch, length, kv_heads, 2, d)
    lambda_init = 0.8 - 0.6 * np.exp(-0.3 * depth)
    lam = np.exp(w["lambda_q1"] @ w["lambda_k1"]) - np.exp(w["lambda_q2"] @ w["lambda_k2"]) + lambda_init
    outputs = []
    for p in range(heads):
        g = p // (heads // kv_heads)
        a1 = causal_attention(q[:, :, p, 0], k[:, :, g, 0]) @ v[:, :, g]
        a2 = causal_attention(q[:, :, p, 1], k[:, :, g, 1]) @ v[:, :, g]
        normed = rms_norm(a1 - lam * a2, w["subln.weight"], attention["subln_eps"])
        outputs.append(normed * (1 - lambda_init))
    return np.concatenate(outputs, axis=-1) @ w["out_proj.weight"].T


def flash_diff_v2(x, w, attention: dict, theta: float) -> np.ndarray:
    """`MultiheadFlashDiffV2.forward`: adjacent query heads pair up; `use_diff_v2=False` is the baseline."""
    batch, length, _ = x.shape
    heads, kv_heads, d = attention["num_heads"], attention["num_kv_heads"], attention["head_dim"]
    query_heads = 2 * heads if attention["use_diff_v2"] else heads
    q = rope_interleaved((x @ w["q_proj.weight"].T).reshape(batch, length, query_heads, d), theta)
    k = rope_interleaved((x @ w["k_proj.weight"].T).reshape(batch, length, kv_heads, d), theta)
    v = (x @ w["v_proj.weight"].T).reshape(batch, length, kv_heads, d)
    group = query_heads // kv_heads
    attn = np.stack(
        [causal_attention(q[:, :, j], k[:, :, j // group]) @ v[:, :, j // group] for j in range(query_heads)], 2
    )
    if attention["use_diff_v2"]:
        lam = 1 / (1 + np.exp(-(x @ w["lambda_proj.weight"].T)))
        attn = attn[:, :, 0::2] - lam[..., None] * attn[:, :, 1::2]
    return attn.reshape(batch, length, -1) @ w["o_proj.weight"].T


def microsoft_forward(tensors: dict[str, np.ndarray], args: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of the whole decoder: pre-norm blocks, SwiGLU (w2(silu(w1 x) * w3 x)), final norm, output."""
    w = {name: value.astype(np.float64) for name, value in tensors.items()}
    decoder, attention = args["decoder"], args["attention"]
    eps, theta = decoder["norm_eps"], decoder["rope_theta"]
    h = w["tok_embeddings.weight"][ids]
    for layer in range(decoder["n_layers"]):
        prefix = f"layers.{layer}."
        attn_weights = {
            k.removeprefix(prefix + "attention."): v for k, v in w.items() if k.startswith(prefix + "attention.")
        }
        x = rms_norm(h, w[prefix + "attention_norm.weight"], eps)
        if attention["class"] == "MultiheadFlashDiff1":
            h = h + flash_diff_1(x, attn_weights, attention, layer, theta)
        else:
            h = h + flash_diff_v2(x, attn_weights, attention, theta)
        x = rms_norm(h, w[prefix + "ffn_norm.weight"], eps)
        gate = x @ w[prefix + "feed_forward.w1.weight"].T
        hidden = gate / (1 + np.exp(-gate)) * (x @ w[prefix + "feed_forward.w3.weight"].T)
        h = h + hidden @ w[prefix + "feed_forward.w2.weight"].T
    output = w["tok_embeddings.weight"] if decoder["tie_embeddings"] else w["output.weight"]
    return rms_norm(h, w["norm.weight"], eps) @ output.T


@pytest.mark.parametrize("name", CASES)
def test_export_matches_the_official_forward_and_imports_back_bit_exactly(name, tmp_path):
    cfg = _config(name)
    params = random_params(cfg)
    export_microsoft(tmp_path, params, cfg, dtype="float32", max_shard_size="5GB")
    tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    args = json.loads((tmp_path / ARGS).read_text())
    ids = tokens(cfg)
    difference = np.abs(microsoft_forward(tensors, args, ids) - logits(cfg, params, ids)).max()
    print(f"{name}: max abs logit difference to the NumPy official forward {difference:.2e}")
    assert difference <= 1e-5

    imported_cfg, imported = import_microsoft(tmp_path)
    assert imported_cfg == dataclasses.replace(cfg, vocab_multiple=1)  # the format holds the real vocabulary only
    assert tensors["tok_embeddings.weight"].shape == (cfg.vocab_size, cfg.emb_dim)
    assert_same_params(imported, params)


def test_v1_and_v2_attention_tensors_are_the_official_modules_state_dicts(tmp_path):
    expected = {
        "diff": {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "subln.weight"}
        | {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"},
        "diff_v2": {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "lambda_proj.weight"},
    }
    for attention_type, names in expected.items():
        cfg = case_config("gqa4_tied_gain", attention_type=attention_type)
        directory = tmp_path / attention_type
        directory.mkdir()
        export_microsoft(directory, random_params(cfg), cfg, dtype="bfloat16", max_shard_size="5GB")
        with safetensors_numpy.safe_open(directory / "model.safetensors", "np") as f:
            stored = list(f.keys())
        prefix = "layers.0.attention."
        layer0 = {key.removeprefix(prefix) for key in stored if key.startswith(prefix)}
        assert layer0 == names
        args = json.loads((directory / ARGS).read_text())
        if attention_type == "diff_v2":
            assert args["attention"] == {
                "class": "MultiheadFlashDiffV2",
                "use_diff_v2": True,
                "d_model": 64,
                "num_heads": 4,
                "num_kv_heads": 1,
                "head_dim": 8,
            }
        else:
            assert args["attention"]["class"] == "MultiheadFlashDiff1"
            assert args["attention"]["args"] == {"decoder_kv_attention_heads": 1, "model_parallel_size": 1}
