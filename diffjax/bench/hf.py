"""The Hugging Face PyTorch baseline: `DiffLlamaForCausalLM` of the same shape, trained with AdamW.

Imported only by `--compare_hf` / `--hf_only` (the `hf` extra: torch, transformers). The model matches
diffjax's (SPEC section 1): 2H attention heads of width E / 2H, 2Hkv key/value heads, SwiGLU of width
`mlp_dim`, tied embeddings, SDPA attention, float32 (diffjax's per-head RMSNorm also carries a gain of 2d
values, which HF's lacks); the optimizer step matches diffjax's (global-norm
clipping at 1.0, then AdamW with the same hyperparameters).
"""

import os
from collections.abc import Callable

import ml_collections

from diffjax.bench.train_step import Shape, bench_config, random_tokens
from diffjax.cli import UsageError


def hf_step(shape: Shape) -> Callable[[], None]:
    """A closure running one PyTorch training step on a fixed synthetic batch (torch runs synchronously on CPU)."""
    try:
        import torch
        from transformers import DiffLlamaConfig, DiffLlamaForCausalLM
    except ImportError as error:
        raise UsageError(f"--compare_hf needs the hf extra (pip install -e '.[hf]'): {error}") from error
    if shape.dtype != "float32":
        raise UsageError(f"--compare_hf compares float32 training only (got --dtype={shape.dtype})")
    config = bench_config(shape)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    model = DiffLlamaForCausalLM(hf_config(DiffLlamaConfig, shape, config)).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_b1, config.adam_b2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    tokens = torch.from_numpy(random_tokens(shape))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()

    return step


def hf_config(config_class: type, shape: Shape, config: ml_collections.ConfigDict):
    """`DiffLlamaConfig` of the same network: Hugging Face counts 2H heads of width d where diffjax counts H."""
    model = config.model
    return config_class(
        vocab_size=shape.vocab_size,
        hidden_size=shape.emb_dim,
        intermediate_size=shape.mlp_dim,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=2 * shape.num_heads,
        num_key_value_heads=2 * shape.num_kv_heads,
        max_position_embeddings=max(shape.seq_len, 2048),
        rms_norm_eps=model.rms_norm_eps,
        initializer_range=model.init_std,
        lambda_std_dev=model.lambda_std_dev,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        tie_word_embeddings=model.tie_embeddings,
        use_cache=False,
        attn_implementation="sdpa",
        dtype="float32",
    )
