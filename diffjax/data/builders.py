"""TFDS builders (array_record) for the datasets diffjax makes itself; built on first use, no download.

Each builder's config name is a fingerprint of everything that shapes its data, so a changed file
list or needle setting builds a new dataset beside the old one instead of reusing a stale one.
"""

import dataclasses
import glob
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffjax import files
from diffjax.config import ConfigError
from diffjax.data import corpus, needles

VERSION = tfds.core.Version("1.0.0")
FILE_FORMAT = "array_record"  # random access for grain, and written without TensorFlow
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DiffjaxCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The embedded Python documentation (see `diffjax.data.corpus`), split by document-name hash."""

    VERSION = VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        for title, text in corpus.python_doc_items(split):
            yield title, {"text": text, "title": title}


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    text_field: str = "text"


def _matching_files(pattern: str) -> list[str]:
    """Absolute paths (or gs:// URLs) of the files a path or glob names."""
    if files.is_remote(pattern):
        store = files.filesystem(pattern)
        return [f"gs://{match}" for match in store.glob(pattern) if store.isfile(match)]
    matches = [Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True)]
    return [str(m.resolve()) for m in matches if m.is_file()]


def _stamp(path: str) -> tuple[int, int | float]:
    """(size, modification time) of a data file: what decides whether its dataset must be built again."""
    if files.is_remote(path):
        stat = files.path(path).stat()
        return stat.length, stat.mtime
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def resolve_files(patterns: str) -> tuple[str, ...]:
    """Sorted absolute paths (or gs:// URLs) of comma-separated paths or globs; each must match a text file."""
    found: set[str] = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = [files.path(m) for m in _matching_files(pattern)]
        if not matched:
            raise ConfigError(f"data.files: no file matches {pattern!r}; check the path or glob")
        for file in matched:
            if file.suffix not in TEXT_SUFFIXES:
                raise ConfigError(f"data.files: {file} is not one of {', '.join(TEXT_SUFFIXES)}; rename or remove it")
            _check_text_file(file)
            found.add(str(file))
    if not found:
        raise ConfigError("data.files is empty; give comma-separated paths or globs of .txt, .md or .jsonl files")
    return tuple(sorted(found))


def _check_text_file(path: epath.Path) -> None:
    """Reject unreadable or binary files up front, with the file's name (not deep inside a build)."""
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError as error:
        raise ConfigError(f"data.files: cannot read {path}: {error.strerror}") from None
    if b"\0" in head:
        raise ConfigError(f"data.files: {path} looks binary (it holds NUL bytes); give UTF-8 text files")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # a multi-byte character cut at the 64 KiB boundary is fine
            raise ConfigError(f"data.files: {path} is not UTF-8 text (byte {error.start})") from None


def _documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(key, text) for each document: the whole file, or each JSON line's `text_field`."""
    try:
        content = files.path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"data.files: {path} is not UTF-8 text (byte {error.start})") from None
    if not path.endswith(".jsonl"):
        if content.strip():
            yield path, content
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"data.files: {path}:{number} is not a JSON object with a {text_field!r} field") from None
        if not isinstance(text, str):
            raise ConfigError(f"data.files: {path}:{number} field {text_field!r} is not a string")
        if text.strip():
            yield f"{path}:{number}", text


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A user's .txt/.md files (one document each) and .jsonl files (one document per line)."""

    VERSION = VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        """Only non-empty splits: TFDS refuses to write an empty one, and an empty train split is an error."""
        del dl_manager
        c = self.builder_config
        threshold = round(c.validation_fraction * 10_000)
        splits: dict[str, list[tuple[str, dict[str, str]]]] = {"train": [], "validation": []}
        for path in c.files:
            for key, text in _documents(path, c.text_field):
                held_out = zlib.crc32(key.encode()) % 10_000 < threshold
                splits["validation" if held_out else "train"].append((key, {"text": text}))
        if not splits["train"]:
            raise ConfigError(f"data.files holds no training text ({len(c.files)} files); give non-empty files")
        return {name: self._generate_examples(examples) for name, examples in splits.items() if examples}

    def _generate_examples(self, examples: list[tuple[str, dict[str, str]]]) -> Iterator[tuple[str, dict[str, str]]]:
        yield from examples


def corpus_builder(data_dir: str) -> DiffjaxCorpus:
    return DiffjaxCorpus(data_dir=data_dir, file_format=FILE_FORMAT)


def text_files_builder(patterns: str, validation_fraction: float, text_field: str, data_dir: str) -> TextFiles:
    paths = resolve_files(patterns)
    stats = [(p, *_stamp(p)) for p in paths]
    name = "files_" + fingerprint(stats, validation_fraction, text_field)
    config = TextFilesConfig(
        name=name, files=paths, validation_fraction=validation_fraction, text_field=text_field, version=VERSION
    )
    return TextFiles(config=config, data_dir=data_dir, file_format=FILE_FORMAT)


@dataclasses.dataclass
class NeedlesConfig(tfds.core.BuilderConfig):
    context_length: int = 4096
    num_needles: int = 4
    num_queries: int = 2
    depth: float = 0.5
    num_train: int = 2048
    num_validation: int = 128
    seed: int = 0


class Needles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Multi-needle retrieval documents (SPEC section 7) over a haystack of the embedded corpus's prose."""

    VERSION = VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "text": tfds.features.Text(),
                "prompt": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "cities": tfds.features.Sequence(tfds.features.Text()),
                "depth": tfds.features.Scalar(dtype=np.float32),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train, c.seed),
            "validation": self._generate_examples("validation", c.num_validation, c.seed + 1),
        }

    def _generate_examples(self, split: str, count: int, seed: int) -> Iterator[tuple[int, dict]]:
        c = self.builder_config
        filler = needles.split_sentences(corpus.python_docs(split))
        for index in range(count):
            doc = needles.make_document(
                filler,
                index,
                seed=seed,
                context_length=c.context_length,
                num_needles=c.num_needles,
                num_queries=c.num_queries,
                depth=c.depth,
            )
            yield (
                index,
                {
                    "text": doc.text,
                    "prompt": doc.prompt,
                    "answers": list(doc.answers),
                    "cities": list(doc.cities),
                    "depth": doc.depth,
                },
            )


def needles_builder(settings: dict, data_dir: str) -> Needles:
    name = "needles_" + fingerprint(settings)
    config = NeedlesConfig(name=name, version=VERSION, **settings)
    return Needles(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
