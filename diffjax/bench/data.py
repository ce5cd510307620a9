"""Input-pipeline throughput: how many tokens per second grain delivers to the train step."""

import time

import ml_collections

from diffjax.config import check_tokenizer, validate
from diffjax.data.pipeline import make_dataset
from diffjax.data.tokenizer import load_tokenizer


def benchmark_data(config: ml_collections.ConfigDict, batches: int, warmup: int) -> dict[str, float]:
    """Time `batches` training batches after `warmup` (which absorbs dataset building and thread start-up)."""
    validate(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    iterator = iter(make_dataset(config, tokenizer, "train"))
    try:
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        kept = 0.0
        for _ in range(batches):
            kept += float(next(iterator)["loss_mask"].sum())
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    rows = config.batch_size * batches
    return {
        "tokens_per_s": rows * config.seq_len / seconds,
        "kept_fraction": kept / (rows * config.seq_len),
        "batches_per_s": batches / seconds,
    }
