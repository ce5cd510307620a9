"""The grain input pipeline: documents -> shuffle -> repeat -> host shard -> tokenize -> pack -> shuffle rows
-> batch -> prefetch.

For a given config the batch at step s is a pure function of (seed, s, process count), and the
iterator's position is checkpointable with `get_state()` / `set_state()`. Packed rows carry
`segment_ids` (0 = padding) and per-document `positions`, so the model never attends across documents,
and every target belongs to the document of its input (the loss never crosses a boundary).
"""

import grain
import jax
import ml_collections
import numpy as np

from diffjax.config import ConfigError, parse_mixture
from diffjax.data.sources import open_split

Batch = dict[str, np.ndarray]
PACKED_FEATURES = ("inputs", "targets")


def _documents(data: ml_collections.ConfigDict, split: str, seed: int, train: bool) -> grain.MapDataset:
    """The mixture's documents; for training globally shuffled (reshuffled every epoch) and repeated."""
    mixture = parse_mixture(data)
    parts = []
    for offset, (name, _) in enumerate(mixture):
        documents = open_split(name, data, split)
        if train:
            documents = documents.shuffle(seed=seed + offset).repeat(data.num_epochs or None)
        parts.append(documents)
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, [weight for _, weight in mixture])


class _Tokenize(grain.transforms.Map):
    """`BOS text EOS` as (input, target) pairs: a document of n tokens gives n - 1 predictions."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        t = self.tokenizer
        ids = np.concatenate([[t.bos_id], t.encode(text), [t.eos_id]]).astype(np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


class _SplitLong(grain.experimental.FlatMapTransform):
    """Cut documents into pieces of at most `length` pairs, so first-fit packing truncates nothing."""

    def __init__(self, length: int):
        self.length = length

    def flat_map(self, element: dict[str, np.ndarray]):
        size = len(element["inputs"])
        return [{k: v[i : i + self.length] for k, v in element.items()} for i in range(0, size, self.length)]


def _model_inputs(row: dict[str, np.ndarray]) -> Batch:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
        "loss_mask": (row["targets_segment_ids"] != 0).astype(np.float32),
    }


def host_documents(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> grain.MapDataset:
    """This process's share of the (shuffled, repeated, mixed) documents: every `process_count`-th one."""
    return _documents(config.data, split, config.seed, split == "train")[process_index::process_count]


def _stack_padded(batch_size: int):
    """Stack rows into a batch, padding a short final batch with empty rows (shapes never change)."""

    def stack(rows: list[Batch]) -> Batch:
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        missing = batch_size - len(rows)
        return {k: np.pad(v, [(0, missing), (0, 0)]) for k, v in batch.items()} if missing else batch

    return stack


def per_process_batch_size(config: ml_collections.ConfigDict, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {process_count} JAX processes")
    return config.batch_size // process_count


def make_dataset(
    config: ml_collections.ConfigDict,
    tokenizer,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of `split` for one process: `inputs, targets, segment_ids, positions, loss_mask` `[b, seq_len]`."""
    data = config.data
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = per_process_batch_size(config, process_count)
    train = split == "train"

    documents = host_documents(config, split, process_index, process_count)
    threads = data.num_workers if data.prefetch == "threads" else 0
    read = grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=max(4 * threads, 1))
    pairs = documents.map(_Tokenize(tokenizer)).to_iter_dataset(read)
    lengths = {key: config.seq_len for key in PACKED_FEATURES}
    if data.packing == "first_fit":
        pairs = grain.experimental.FlatMapIterDataset(pairs, _SplitLong(config.seq_len))
        packed = grain.experimental.FirstFitPackIterDataset(
            pairs, length_struct=lengths, num_packing_bins=max(batch_size, 8), seed=config.seed, shuffle_bins=train
        )
    else:
        packed = grain.experimental.ConcatThenSplitIterDataset(pairs, length_struct=lengths)
    if train and data.shuffle_window > 1:  # rows of one long document would otherwise fill whole batches
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=data.shuffle_window, seed=config.seed)
    batches = packed.map(_model_inputs).batch(batch_size, batch_fn=_stack_padded(batch_size))
    if data.prefetch == "processes" and data.num_workers > 0:
        return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    if data.prefetch == "threads":
        return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)
    return batches


def eval_batches(
    config: ml_collections.ConfigDict, tokenizer, split: str = "validation", count: int = 0, **process
) -> list[Batch]:
    """The first `count` (0: `eval_batches`) batches of `split` (all of the split if it holds fewer)."""
    batches = []
    iterator = iter(make_dataset(config, tokenizer, split, **process))
    try:
        for batch in iterator:
            batches.append(batch)
            if len(batches) == (count or config.eval_batches):
                break
    finally:
        iterator.close()
    if not batches:
        raise ConfigError(f"the {split} split is empty; use another source or a larger data.validation_fraction")
    return batches
