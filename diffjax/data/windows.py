"""Training and validation batches cut from one tokenised stream of documents.

Each batch is a pure function of (seed, step): the same after a restart. Windows may span document
boundaries; `segment_ids` and `positions` restart at each document and `loss_mask` drops the one
target that belongs to the next document.
"""

import numpy as np

from diffjax.config import ConfigError
from diffjax.data.tokenizer import ByteTokenizer

Batch = dict[str, np.ndarray]


class DocumentStream:
    """`BOS doc EOS BOS doc EOS ...` with the document index and in-document position of every token."""

    def __init__(self, documents: list[str], tokenizer: ByteTokenizer):
        pieces = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(d), [tokenizer.eos_id]]) for d in documents]
        if not pieces:
            raise ConfigError("the corpus has no documents")
        self.tokens = np.concatenate(pieces).astype(np.int32)
        self.document = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
        self.position = np.concatenate([np.arange(len(p), dtype=np.int32) for p in pieces])

    def __len__(self) -> int:
        return len(self.tokens)

    def check_window(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise ConfigError(f"seq_len={seq_len} is longer than the corpus split ({len(self)} tokens); lower seq_len")

    def windows(self, starts: np.ndarray, seq_len: int) -> Batch:
        """Model inputs for windows of `seq_len + 1` tokens beginning at `starts`."""
        index = starts[:, None] + np.arange(seq_len + 1)
        document = self.document[index]
        return {
            "inputs": self.tokens[index[:, :-1]],
            "targets": self.tokens[index[:, 1:]],
            "segment_ids": document[:, :-1] - document[:, :1] + 1,
            "positions": self.position[index[:, :-1]],
            "loss_mask": (document[:, 1:] == document[:, :-1]).astype(np.float32),
        }

    def random_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        """Uniformly placed windows; a pure function of (seed, step)."""
        rng = np.random.default_rng([seed, step])
        return self.windows(rng.integers(0, len(self) - seq_len, size=batch_size), seq_len)

    def fixed_batches(self, num_batches: int, batch_size: int, seq_len: int) -> list[Batch]:
        """Up to `num_batches` batches of consecutive, non-overlapping windows (for validation)."""
        count = min(num_batches * batch_size, (len(self) - 1) // seq_len) // batch_size
        if count == 0:
            raise ConfigError(
                f"the validation split ({len(self)} tokens) cannot fill one batch of {batch_size} x {seq_len}; "
                "lower batch_size or seq_len"
            )
        starts = np.arange(count * batch_size) * seq_len
        return [self.windows(chunk, seq_len) for chunk in starts.reshape(count, batch_size)]
