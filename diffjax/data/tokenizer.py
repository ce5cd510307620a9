"""Tokenizers: byte-level (the default, needs nothing) and SentencePiece (trained offline on the corpus).

Both reserve `PAD=0, BOS=1, EOS=2`, so the rest of the pipeline does not care which one it has.

    python -m diffjax.data.tokenizer train --config=configs/tiny.py --vocab_size=8192 --out=tok.model
    python train.py --config.data.tokenizer=tok.model --config.model.vocab_size=8192
"""

import io
import numbers
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffjax.config import ConfigError
from diffjax.files import write_atomically

if TYPE_CHECKING:
    import sentencepiece as spm

TRAIN_COMMAND = "python -m diffjax.data.tokenizer train"
SPACE_MARKER = "\u2581"  # SentencePiece's stand-in for a space; a literal one in the text needs byte pieces
MAX_TRAINING_BYTES = 64_000_000  # text read for training: bounds time and memory on TFDS-sized corpora
MAX_SENTENCE_BYTES = 4_000  # SentencePiece silently skips "sentences" over 4192 bytes


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


def _read_model(path: Path) -> "spm.SentencePieceProcessor":
    import sentencepiece as spm  # imported on use: training with the byte tokenizer runs without it

    use = f"set data.tokenizer to a .model file written by `{TRAIN_COMMAND}`, or to 'byte'"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"SentencePiece model {path} not found; train it with `{TRAIN_COMMAND} --out={path}`"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read SentencePiece model {path} ({error.strerror}); {use}") from None
    try:  # an empty file parses as an empty model, which then logs errors on every call
        processor = spm.SentencePieceProcessor(model_proto=data) if data else None
    except RuntimeError:
        processor = None
    if processor is None or processor.vocab_size() == 0:
        raise ConfigError(f"{path} is not a SentencePiece model; {use}")
    return processor


class SentencePieceTokenizer:
    """A SentencePiece model with the special ids of `ByteTokenizer` (PAD=0, BOS=1, EOS=2, UNK=3).

    Models from `train_sentencepiece` use identity normalisation and byte fallback, so `decode(encode(t)) == t`
    for any text.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.processor = _read_model(self.path)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = self.processor.vocab_size()
        found = (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id())
        if found != (self.pad_id, self.bos_id, self.eos_id):
            raise ConfigError(
                f"SentencePiece model {self.path} has pad/bos/eos ids {'/'.join(map(str, found))}, not 0/1/2; "
                f"retrain it with `{TRAIN_COMMAND}`, which reserves them"
            )
        self._marker_ids = self._byte_ids(SPACE_MARKER)

    def _byte_ids(self, char: str) -> list[int] | None:
        """Byte-fallback ids spelling `char`, or None when the model has no byte pieces."""
        ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        return None if self.processor.unk_id() in ids else ids

    def encode(self, text: str) -> np.ndarray:
        """Ids of `text`, without BOS/EOS.

        A literal U+2581 would come back as a space (it is SentencePiece's space marker), so it is spelled
        in byte pieces instead.
        """
        if SPACE_MARKER not in text or self._marker_ids is None:
            return np.asarray(self.processor.encode(text), dtype=np.int32)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARKER)):
            ids.extend(self._marker_ids if i else [])
            ids.extend(self.processor.encode(part))
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; PAD/BOS/EOS and ids beyond the vocabulary (a padded model's) are dropped."""
        special = (self.pad_id, self.bos_id, self.eos_id)
        return self.processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in special])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer `config.data.tokenizer` names: "byte", or the path of a SentencePiece model."""
    return ByteTokenizer() if spec == "byte" else SentencePieceTokenizer(Path(spec).expanduser())


def _take_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """`texts` until `max_bytes` of UTF-8 have gone by (the document that crosses the limit is the last)."""
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


def _split_long(line: str) -> list[str]:
    """`line` in slices SentencePiece accepts (a UTF-8 character is at most 4 bytes)."""
    step = MAX_SENTENCE_BYTES // 4
    return [line] if len(line) <= step else [line[i : i + step] for i in range(0, len(line), step)]


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Documents cut at line ends into "sentences" SentencePiece accepts; newlines stay in, so pieces learn them."""
    for text in texts:
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            for part in _split_long(line):
                part_size = len(part.encode("utf-8"))
                if chunk and size + part_size > MAX_SENTENCE_BYTES:
                    yield "".join(chunk)
                    chunk, size = [], 0
                chunk.append(part)
                size += part_size
        if chunk:
            yield "".join(chunk)


def _training_error(error: RuntimeError, vocab_size: int) -> Exception:
    """One line, in our terms, for SentencePiece's `INTERNAL: file.cc(n) [check] message` errors."""
    lines = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ?", "", str(error).strip()).splitlines()
    message = lines[0] if lines else ""
    if high := re.search(r"<= (\d+)", message):
        return ConfigError(
            f"vocab_size={vocab_size} is more pieces than this text supports; set it to at most {high[1]}"
        )
    if low := re.search(r"required_chars\. \d+ vs (\d+)", message):
        return ConfigError(
            f"vocab_size={vocab_size} leaves no room for the special ids, 256 bytes and the text's characters; "
            f"set it to at least {low[1]}"
        )
    if "sentences_.empty()" in str(error):
        return ConfigError("no training text: the configured corpus yielded no documents")
    return ConfigError(f"SentencePiece training failed: {message or type(error).__name__}")


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, out: str | os.PathLike, *, seed: int = 0
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `texts` (documents) and write it to `out`.

    BPE rather than unigram: on the 0.4 MB embedded corpus unigram cannot reach 8192 pieces (it stops near
    4.6k) while BPE does, in under a second; BPE training is also deterministic and we do not use
    unigram's subword sampling. Identity normalisation, no dummy prefix, kept whitespace and byte fallback
    make encoding lossless. Training runs in memory (no temporary input or model files); at most
    `MAX_TRAINING_BYTES` of text are read.
    """
    out = Path(out).expanduser()
    if not isinstance(vocab_size, numbers.Integral) or vocab_size <= 0:
        raise ConfigError(f"vocab_size={vocab_size!r} must be a positive integer")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: directory {out.parent} does not exist; create it first")
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # drives the sampling of input sentences
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(_take_bytes(texts, MAX_TRAINING_BYTES)),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,  # rarer characters become byte pieces rather than vocabulary entries
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single pieces
            split_digits=True,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            num_threads=2,
            input_sentence_size=100_000,  # about 400 MB of sentences: never reached under MAX_TRAINING_BYTES
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise _training_error(error, vocab_size) from None
    try:
        write_atomically(out, model.getvalue())
    except OSError as error:
        raise ConfigError(f"cannot write {out} ({error.strerror}); pass a writable --out path") from None
    return SentencePieceTokenizer(out)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Mean UTF-8 bytes per token over `texts`: how much the tokenizer shortens sequences."""
    num_bytes = num_tokens = 0
    for text in texts:
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(tokenizer.encode(text))
    return num_bytes / max(num_tokens, 1)


def main(argv: list[str]) -> None:
    """`train`: fit a SentencePiece model to the configured corpus's training documents."""
    from absl import flags

    from diffjax.cli import UsageError
    from diffjax.data.sources import training_texts

    if argv[1:] != ["train"]:
        raise UsageError(f"expected the command `train`, got {argv[1:] or 'none'}; usage: {TRAIN_COMMAND} --out=...")
    config, out = flags.FLAGS.config, Path(flags.FLAGS.out).expanduser()
    texts = list(_take_bytes(training_texts(config.data), MAX_TRAINING_BYTES))
    tokenizer = train_sentencepiece(texts, flags.FLAGS.vocab_size, out)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    print(f"wrote {out}")
    print(f"vocab size {tokenizer.vocab_size}")
    print(f"{bytes_per_token(tokenizer, texts):.3f} bytes per token on {len(texts)} documents, {num_bytes:,} bytes")
    print(f"use it with --config.data.tokenizer={out} --config.model.vocab_size={tokenizer.vocab_size}")


def _cli() -> None:
    """Flags exist only when run as a program, so importing this module defines none."""
    from absl import flags

    from diffjax.cli import run_main

    flags.DEFINE_integer("vocab_size", None, "Number of pieces, special and byte ids included.", lower_bound=1)
    flags.DEFINE_string("out", None, "Where to write the .model file.")
    flags.mark_flags_as_required(["vocab_size", "out"])
    default_config = Path(__file__).resolve().parents[2] / "configs" / "tiny.py"
    run_main(TRAIN_COMMAND.removesuffix(" train"), main, default_config=default_config)


if __name__ == "__main__":
    _cli()
