"""Tokenizers: byte-level (the default, needs nothing), SentencePiece, and Hugging Face `tokenizer.json` files.

Each has `encode`, `decode`, `vocab_size` and the special ids `pad_id`, `bos_id`, `eos_id`, which is all the
pipeline uses. The byte tokenizer and models trained here reserve `PAD=0, BOS=1, EOS=2`; a `tokenizer.json`
brings its own (Llama 3's BOS is 128000), read from the `tokenizer_config.json` beside it or from the
usual token names. SentencePiece models and byte-level BPE `tokenizer.json` files are trained here:

    python -m diffjax.data.tokenizer train --config=configs/tiny.py --vocab_size=8192 --out=tok.model  # SentencePiece
    python -m diffjax.data.tokenizer train --config=configs/tiny.py --vocab_size=8192 --out=tok.json   # byte-level BPE
    python train.py --config.data.tokenizer=tok.model --config.model.vocab_size=8192
"""

import io
import json
import numbers
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from diffjax import files
from diffjax.config import ConfigError

if TYPE_CHECKING:
    import sentencepiece as spm
    import tokenizers

TRAIN_COMMAND = "python -m diffjax.data.tokenizer train"
SPACE_MARKER = "\u2581"  # SentencePiece's stand-in for a space; a literal one in the text needs byte pieces
MAX_TRAINING_BYTES = 64_000_000  # text read for training: bounds time and memory on TFDS-sized corpora
MAX_SENTENCE_BYTES = 4_000  # SentencePiece silently skips "sentences" over 4192 bytes
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"  # transformers' file naming the special tokens, when beside it
# The reserved tokens of a BPE trained here (ids 0, 1, 2), then the names common tokenizers give them.
HF_SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>")
HF_NAMES = {
    "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"),
    "eos": ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
    "pad": ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|padding|>"),
}


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


def _read_model(path: epath.Path) -> "spm.SentencePieceProcessor":
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
        self.path = files.path(path)
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


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json` (BPE, Unigram or WordPiece, read by the `tokenizers` library), given as the
    file or a directory holding it.

    BOS and EOS must exist: they come from `tokenizer_config.json` beside the file (`bos_token`,
    `eos_token`, `pad_token`, as transformers writes them) or else from the usual names (`<|begin_of_text|>`,
    `<s>`, `<|endoftext|>`, ...). PAD falls back to EOS: padded positions never reach the loss. Encoding
    adds no special tokens (the pipeline adds BOS and EOS itself), and reads a special token's spelling in
    the text as text, as the byte tokenizer and SentencePiece do.
    """

    def __init__(self, path: str | os.PathLike):
        path = files.path(path)
        self.path = path / HF_FILE if path.is_dir() else path
        self.tokenizer = _read_tokenizer_json(self.path)
        self.tokenizer.encode_special_tokens = True  # "<|eos|>" in a document is text, never an EOS id
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        named = _configured_special_tokens(self.path.parent / HF_CONFIG)
        ids = {role: self._special_id(role, named.get(role)) for role in ("bos", "eos", "pad")}
        for role in ("bos", "eos"):
            if ids[role] is None:
                raise ConfigError(
                    f"{self.path} has no {role.upper()} token under the usual names {list(HF_NAMES[role])}; "
                    f"name it as {role}_token in a {HF_CONFIG} beside it"
                )
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]

    def __setstate__(self, state: dict) -> None:
        """Unpickled (grain's worker processes): the library's pickle drops `encode_special_tokens`."""
        self.__dict__.update(state)
        self.tokenizer.encode_special_tokens = True

    def _special_id(self, role: str, configured: str | None) -> int | None:
        """The id of the token `tokenizer_config.json` names for `role`, else of the first usual name present."""
        if configured is not None:
            token_id = self.tokenizer.token_to_id(configured)
            if token_id is None:
                raise ConfigError(f"{HF_CONFIG} names {role}_token={configured!r}, which {self.path} does not have")
            return token_id
        return next((i for name in HF_NAMES[role] if (i := self.tokenizer.token_to_id(name)) is not None), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens and ids beyond the vocabulary (a padded model's) are dropped."""
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def _read_tokenizer_json(path: epath.Path) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer as HFTokenizer  # imported on use, like sentencepiece

    if not path.is_file():
        raise ConfigError(
            f"tokenizer file {path} not found; set data.tokenizer to a {HF_FILE} (or its directory), "
            f"a SentencePiece .model, or 'byte'"
        )
    try:
        return HFTokenizer.from_str(path.read_text())
    except Exception as error:  # the library raises a bare Exception for malformed files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} is not a Hugging Face tokenizer file ({first})") from None


def _configured_special_tokens(path: epath.Path) -> dict[str, str]:
    """`{"bos": "<s>", ...}` from a transformers `tokenizer_config.json` (tokens as strings or AddedToken dicts)."""
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    named = {}
    for role in ("bos", "eos", "pad"):
        token = values.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            named[role] = token
    return named


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HuggingFaceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer `config.data.tokenizer` names: "byte", a `tokenizer.json` (or a directory holding one), or
    the path of a SentencePiece model."""
    if spec == "byte":
        return ByteTokenizer()
    path = files.path(spec)
    if path.is_dir() or path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


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
    out = files.path(out)
    if not isinstance(vocab_size, numbers.Integral) or vocab_size <= 0:
        raise ConfigError(f"vocab_size={vocab_size!r} must be a positive integer")
    if not files.is_remote(out) and not out.parent.is_dir():
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
        files.write_atomically(out, model.getvalue())
    except OSError as error:
        raise ConfigError(f"cannot write {out} ({error.strerror}); pass a writable --out path") from None
    return SentencePieceTokenizer(out)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike) -> HuggingFaceTokenizer:
    """Train a byte-level BPE with the `tokenizers` library on `texts` and write it to `out` as a `tokenizer.json`.

    Ids 0, 1, 2 are `<|pad|>`, `<|bos|>`, `<|eos|>` (as the other tokenizers here), then the 256 bytes (GPT-2's
    byte-to-character alphabet, so any text encodes and decodes exactly), then merges. Pre-tokenization
    splits words, numbers and punctuation GPT-2's way, without adding a prefix space.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    out = files.path(out)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(HF_SPECIAL) + len(alphabet)
    if not isinstance(vocab_size, numbers.Integral) or vocab_size < smallest:
        raise ConfigError(f"vocab_size={vocab_size!r} must be at least {smallest}: 3 special ids and 256 bytes")
    if not files.is_remote(out) and not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: directory {out.parent} does not exist; create it first")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(HF_SPECIAL), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_take_bytes(texts, MAX_TRAINING_BYTES), trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size} is more tokens than this text supports; set it to at most "
            f"{tokenizer.get_vocab_size()}"
        )
    try:
        files.write_atomically(out, tokenizer.to_str())
    except OSError as error:
        raise ConfigError(f"cannot write {out} ({error.strerror}); pass a writable --out path") from None
    return HuggingFaceTokenizer(out)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Mean UTF-8 bytes per token over `texts`: how much the tokenizer shortens sequences."""
    num_bytes = num_tokens = 0
    for text in texts:
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(tokenizer.encode(text))
    return num_bytes / max(num_tokens, 1)


def main(argv: list[str]) -> None:
    """`train`: fit a SentencePiece model (`--out=*.model`) or a byte-level BPE (`--out=*.json`) to the
    configured corpus's training documents."""
    from absl import flags

    from diffjax.cli import UsageError
    from diffjax.data.sources import training_texts

    if argv[1:] != ["train"]:
        raise UsageError(f"expected the command `train`, got {argv[1:] or 'none'}; usage: {TRAIN_COMMAND} --out=...")
    config, out = flags.FLAGS.config, files.path(flags.FLAGS.out)
    trainers = {".model": train_sentencepiece, ".json": train_bpe}
    if out.suffix not in trainers:
        raise UsageError(f"--out={out} must end in .model (SentencePiece) or .json (byte-level BPE tokenizer.json)")
    texts = list(_take_bytes(training_texts(config.data), MAX_TRAINING_BYTES))
    tokenizer = trainers[out.suffix](texts, flags.FLAGS.vocab_size, out)
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
    flags.DEFINE_string("out", None, "Where to write the tokenizer: NAME.model (SentencePiece) or NAME.json (BPE).")
    flags.mark_flags_as_required(["vocab_size", "out"])
    default_config = Path(__file__).resolve().parents[2] / "configs" / "tiny.py"
    run_main(TRAIN_COMMAND.removesuffix(" train"), main, default_config=default_config)


if __name__ == "__main__":
    _cli()
