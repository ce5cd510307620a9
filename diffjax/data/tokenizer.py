"""Byte-level tokenizer: every UTF-8 byte is a token, after three reserved ids."""

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
    """`PAD=0, BOS=1, EOS=2`, then byte `b` is id `b + 3`; lossless on any text."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids; special ids are dropped and broken UTF-8 shows as U+FFFD."""
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")
