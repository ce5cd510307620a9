"""The Hugging Face PyTorch baseline: `DiffLlamaForCausalLM` of the same shape, trained with AdamW.

Imported only by `--compare_hf` / `--hf_only` (the `hf` extra: torch, transformers). The model is the one
`python -m diffjax.convert export --format=hf` would write for diffjax's (its config comes from
`diffjax.convert.hf.hf_config`), with SDPA attention in float32 (diffjax's per-head RMSNorm also carries a
gain of 2d values, which HF's lacks); the optimizer step matches diffjax's (global-norm clipping at 1.0,
then AdamW with the same hyperparameters).
"""

import os
from collections.abc import Callable

from diffjax.bench.train_step import Shape, bench_config, random_tokens
from diffjax.cli import UsageError
from diffjax.config import model_config
from diffjax.convert.hf import hf_config


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
    values = hf_config(model_config(config), max_position_embeddings=max(shape.seq_len, 2048))
    hf_model_config = DiffLlamaConfig.from_dict(values, use_cache=False, attn_implementation="sdpa")
    model = DiffLlamaForCausalLM(hf_model_config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_b1, config.adam_b2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    tokens = torch.from_numpy(random_tokens(config))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()

    return step
