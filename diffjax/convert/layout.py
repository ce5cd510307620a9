"""The one name/shape map between diffjax parameters and the PyTorch layouts, driving both directions.

diffjax parameters are a flat dict of NumPy arrays keyed by their NNX path (`blocks/attn/q_proj/kernel`);
`blocks/...` arrays are stacked over layers. A layout names every tensor of a format and says how its
rows are ordered; `to_external` and `from_external` are exact inverses (transposes and permutations only),
so import(export(x)) == x bit for bit. The one lossy step, folding the per-head RMSNorm gain into the output
projection for formats that have no gain, is `fold_subln_gain`, applied before a layout that needs it.
"""

import dataclasses

import numpy as np

from diffjax.cli import UsageError
from diffjax.model import ModelConfig

Params = dict[str, np.ndarray]
SUBLN = "blocks/attn/subln/scale"


class ConversionError(UsageError):
    """An external checkpoint or config that cannot be converted; one line naming the tensor or field."""


def rope_rows(width: int) -> np.ndarray:
    """Interleaved (GPT-J) RoPE row j <- rotate-half (NeoX) row `j // 2 + (j % 2) * width / 2`."""
    j = np.arange(width)
    return j // 2 + (j % 2) * (width // 2)


def interleaved_rows(pairs: int, width: int, rope: bool) -> np.ndarray:
    """Microsoft v1 rows of a projection with `2 * pairs` sub-heads of `width`: sub-heads (2p, 2p+1) are
    diffjax/HF heads p and pairs + p (SPEC section 2); with `rope`, rows within each sub-head are interleaved too."""
    sub = np.arange(2 * pairs)
    heads = sub // 2 + (sub % 2) * pairs
    within = rope_rows(width) if rope else np.arange(width)
    return (heads[:, None] * width + within[None, :]).reshape(-1)


def per_head_rope_rows(heads: int, width: int) -> np.ndarray:
    """Same head order, interleaved RoPE rows within every head (Microsoft V2 and its baseline)."""
    return (np.arange(heads)[:, None] * width + rope_rows(width)[None, :]).reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare the `rows` arrays
class Tensor:
    """One external tensor: its diffjax path, its external name (`{layer}` for per-layer ones) and its row order.

    Kernels (`.../kernel`, flax `[in, out]`) are transposed to torch's `[out, in]`; then external row r is
    diffjax row `rows[r]`.
    """

    ours: str
    theirs: str
    rows: np.ndarray | None = None

    @property
    def per_layer(self) -> bool:
        return self.ours.startswith("blocks/")

    @property
    def transpose(self) -> bool:
        return self.ours.endswith("/kernel")

    def names(self, num_layers: int) -> list[str]:
        return [self.theirs.format(layer=i) for i in range(num_layers)] if self.per_layer else [self.theirs]

    def export(self, value: np.ndarray) -> np.ndarray:
        value = value.T if self.transpose else value
        return np.ascontiguousarray(value if self.rows is None else value[self.rows])

    def restore(self, value: np.ndarray) -> np.ndarray:
        value = value if self.rows is None else value[np.argsort(self.rows)]
        return np.ascontiguousarray(value.T if self.transpose else value)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The tensors of one external format for one model config (parameters it lacks are not listed)."""

    tensors: tuple[Tensor, ...]
    num_layers: int

    def external_shapes(self, ours: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """External name -> shape, from diffjax's shapes (per layer: without the stacked axis)."""
        shapes = {}
        for tensor in self.tensors:
            shape = ours[tensor.ours][1:] if tensor.per_layer else ours[tensor.ours]
            shapes |= dict.fromkeys(tensor.names(self.num_layers), tuple(shape[::-1] if tensor.transpose else shape))
        return shapes

    def to_external(self, params: Params) -> Params:
        out = {}
        for tensor in self.tensors:
            value = params[tensor.ours]
            slices = list(value) if tensor.per_layer else [value]
            out |= {name: tensor.export(v) for name, v in zip(tensor.names(self.num_layers), slices, strict=True)}
        return out

    def from_external(self, tensors: Params, ours: dict[str, tuple[int, ...]]) -> Params:
        """diffjax parameters (shapes `ours`) from external tensors, after checking every name and shape."""
        wanted = self.external_shapes(ours)
        for name, shape in wanted.items():
            if name not in tensors:
                raise ConversionError(f"tensor {name} is missing (expected shape {list(shape)})")
            if tuple(tensors[name].shape) != shape:
                raise ConversionError(
                    f"tensor {name} has shape {list(tensors[name].shape)}; this config needs {list(shape)}"
                )
        if extra := sorted(tensors.keys() - wanted.keys()):
            raise ConversionError(f"unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
        params = {}
        for tensor in self.tensors:
            values = [tensor.restore(tensors[name]) for name in tensor.names(self.num_layers)]
            params[tensor.ours] = np.stack(values) if tensor.per_layer else values[0]
        return params


def fold_subln_gain(params: Params, cfg: ModelConfig) -> Params:
    """Move the per-head RMSNorm gain into the output projection (exact: `o_proj[c, :] *= gain[c mod 2d]`).

    For formats without the gain (Hugging Face DiffLlama); the result is the same function with no gain.
    """
    if SUBLN not in params:
        return params
    gain = np.tile(params[SUBLN], (1, cfg.num_heads))  # [L, 2d] -> [L, 2Hd = E], one copy per head
    folded = {key: value for key, value in params.items() if key != SUBLN}
    kernel = params["blocks/attn/o_proj/kernel"]
    folded["blocks/attn/o_proj/kernel"] = (kernel * gain[:, :, None].astype(kernel.dtype)).astype(kernel.dtype)
    return folded


def _common(names: dict[str, str], cfg: ModelConfig) -> list[Tensor]:
    """Embedding, norms, SwiGLU and LM head: the same in every format but for their names."""
    keys = [
        "embed/embedding",
        "final_norm/scale",
        "blocks/attn_norm/scale",
        "blocks/mlp_norm/scale",
        "blocks/mlp/gate_proj/kernel",
        "blocks/mlp/up_proj/kernel",
        "blocks/mlp/down_proj/kernel",
    ]
    if not cfg.tie_embeddings:
        keys.append("lm_head/kernel")
    return [Tensor(key, names[key]) for key in keys]


HF_NAMES = {
    "embed/embedding": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
    "blocks/attn_norm/scale": "model.layers.{layer}.input_layernorm.weight",
    "blocks/mlp_norm/scale": "model.layers.{layer}.post_attention_layernorm.weight",
    "blocks/mlp/gate_proj/kernel": "model.layers.{layer}.mlp.gate_proj.weight",
    "blocks/mlp/up_proj/kernel": "model.layers.{layer}.mlp.up_proj.weight",
    "blocks/mlp/down_proj/kernel": "model.layers.{layer}.mlp.down_proj.weight",
}
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def hf_layout(cfg: ModelConfig) -> Layout:
    """`DiffLlamaForCausalLM` (diff) or `LlamaForCausalLM` (standard): diffjax's head layout is theirs, so
    only kernels are transposed. The per-head gain must have been folded (`fold_subln_gain`)."""
    attn = "model.layers.{layer}.self_attn."
    tensors = _common(HF_NAMES, cfg)
    tensors += [
        Tensor(f"blocks/attn/{p}/kernel", f"{attn}{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    if cfg.attention_type == "diff":
        tensors += [Tensor(f"blocks/attn/{name}", attn + name) for name in LAMBDAS]
    return Layout(tuple(tensors), cfg.num_layers)


# Microsoft's decoder around the attention module (the YOCO/Mistral-style `Transformer` of microsoft/unilm);
# the attention tensors are exactly the official attention module's own state dict.
MICROSOFT_NAMES = {
    "embed/embedding": "tok_embeddings.weight",
    "final_norm/scale": "norm.weight",
    "lm_head/kernel": "output.weight",
    "blocks/attn_norm/scale": "layers.{layer}.attention_norm.weight",
    "blocks/mlp_norm/scale": "layers.{layer}.ffn_norm.weight",
    "blocks/mlp/gate_proj/kernel": "layers.{layer}.feed_forward.w1.weight",
    "blocks/mlp/down_proj/kernel": "layers.{layer}.feed_forward.w2.weight",
    "blocks/mlp/up_proj/kernel": "layers.{layer}.feed_forward.w3.weight",
}
MICROSOFT_ATTENTION = "layers.{layer}.attention."


def microsoft_layout(cfg: ModelConfig) -> Layout:
    """v1 (`MultiheadFlashDiff1`: interleaved sub-heads and RoPE, `subln.weight`), V2 and its baseline
    (`MultiheadFlashDiffV2`: interleaved RoPE within each head, adjacent query-head pairs as diffjax has them)."""
    attn, d = MICROSOFT_ATTENTION, cfg.head_dim
    h, g = cfg.num_heads, cfg.num_kv_heads
    tensors = _common(MICROSOFT_NAMES, cfg)
    if cfg.attention_type == "diff":
        tensors += [
            Tensor("blocks/attn/q_proj/kernel", f"{attn}q_proj.weight", interleaved_rows(h, d, rope=True)),
            Tensor("blocks/attn/k_proj/kernel", f"{attn}k_proj.weight", interleaved_rows(g, d, rope=True)),
            Tensor("blocks/attn/v_proj/kernel", f"{attn}v_proj.weight", interleaved_rows(g, d, rope=False)),
            Tensor("blocks/attn/o_proj/kernel", f"{attn}out_proj.weight"),
            Tensor(SUBLN, f"{attn}subln.weight"),
        ]
        tensors += [Tensor(f"blocks/attn/{name}", attn + name) for name in LAMBDAS]
        return Layout(tuple(tensors), cfg.num_layers)
    query_heads, kv_heads = 2 * h, g if cfg.attention_type == "diff_v2" else 2 * g
    tensors += [
        Tensor("blocks/attn/q_proj/kernel", f"{attn}q_proj.weight", per_head_rope_rows(query_heads, d)),
        Tensor("blocks/attn/k_proj/kernel", f"{attn}k_proj.weight", per_head_rope_rows(kv_heads, d)),
        Tensor("blocks/attn/v_proj/kernel", f"{attn}v_proj.weight"),
        Tensor("blocks/attn/o_proj/kernel", f"{attn}o_proj.weight"),
    ]
    if cfg.attention_type == "diff_v2":
        tensors.append(Tensor("blocks/attn/lambda_proj/kernel", f"{attn}lambda_proj.weight"))
    return Layout(tuple(tensors), cfg.num_layers)
