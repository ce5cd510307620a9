"""SentencePiece tokenizer: lossless round trips, reserved ids, loading and training errors, the CLI."""

import io
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import REPO, load_config
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.config import ConfigError
from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    bytes_per_token,
    load_tokenizer,
    train_sentencepiece,
)

VOCAB_SIZE = 512
PROGRAM = "python -m diffjax.data.tokenizer"
SPECIAL_IDS = [0, 1, 2, 3]  # PAD, BOS, EOS, UNK


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model for the whole file: trained once on the embedded corpus (about 0.1 s)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    train_sentencepiece(python_docs("train"), VOCAB_SIZE, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_path)


def assert_round_trip(tokenizer: SentencePieceTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert not np.isin(ids, SPECIAL_IDS).any(), "encode must not produce PAD/BOS/EOS/UNK"
    assert ids.max(initial=0) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text


def test_model_has_the_asked_vocab_and_the_byte_tokenizers_special_ids(tokenizer, model_path):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
        ByteTokenizer.pad_id,
        ByteTokenizer.bos_id,
        ByteTokenizer.eos_id,
    )
    assert tokenizer.processor.unk_id() == 3
    assert list(model_path.parent.iterdir()) == [model_path], "no temporary files left behind"


def test_round_trips_held_out_documents_and_compresses_them(tokenizer):
    documents = python_docs("validation")
    for document in documents:
        assert_round_trip(tokenizer, document)
    assert bytes_per_token(tokenizer, documents) > 1.8  # the byte tokenizer's is 1.0


UNUSUAL_TEXTS = [
    "",
    "The quick brown fox.",
    "naïve café — 東京 🐍🎉 👩‍👩‍👧",
    "\ttabs\tand\r\nCRLF\n\n\nblank lines\n",
    "  leading,  double  and trailing spaces  ",
    "a literal \u2581 space marker\u2581\u2581",
    "\x00 NUL, \x7f DEL, \x1b[0m escape",
    "ﬁ ligature, ｱ half-width, ① circled, e\u0301 combining: NFKC would change these",
    "def f(x):\n    return x ** 2  # 12345\n",
]


@pytest.mark.parametrize("text", UNUSUAL_TEXTS)
def test_round_trips_unusual_text_exactly(tokenizer, text):
    assert_round_trip(tokenizer, text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_round_trips_any_text(tokenizer, text):
    assert_round_trip(tokenizer, text)


def test_splits_digits(tokenizer):
    assert len(tokenizer.encode("20250101")) == 8


def test_decode_drops_special_and_out_of_vocabulary_ids(tokenizer):
    ids = tokenizer.encode("some text")
    assert tokenizer.decode([1, *ids, 2, 0, 0, VOCAB_SIZE, VOCAB_SIZE + 7]) == "some text"


def test_pickles_for_worker_processes(tokenizer):
    text = "pickled \u2581 tokenizer"
    clone = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(clone.encode(text), tokenizer.encode(text))
    assert clone.decode(clone.encode(text)) == text


def test_training_is_deterministic(model_path, tmp_path):
    again = tmp_path / "again.model"
    train_sentencepiece(python_docs("train"), VOCAB_SIZE, again)
    assert again.read_bytes() == model_path.read_bytes()


def test_load_tokenizer_byte_path_and_home_path(model_path, tokenizer, monkeypatch):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    loaded = load_tokenizer(str(model_path))
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.vocab_size == VOCAB_SIZE
    np.testing.assert_array_equal(loaded.encode("hello"), tokenizer.encode("hello"))
    monkeypatch.setenv("HOME", str(model_path.parent))
    assert load_tokenizer(f"~/{model_path.name}").vocab_size == VOCAB_SIZE


def _write_model_with_default_ids(path: Path) -> None:
    """A SentencePiece model trained with the library's defaults: UNK=0, BOS=1, EOS=2 and no PAD."""
    model = io.BytesIO()
    sentences = iter(python_docs("train")[0].splitlines())
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, vocab_size=100, minloglevel=2)
    path.write_bytes(model.getvalue())


def _bad_model(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.model"
    if kind == "directory":
        return directory
    if kind == "text_file":
        path.write_text("hello\n")
    if kind == "empty_file":
        path.write_bytes(b"")
    if kind == "default_ids":
        _write_model_with_default_ids(path)
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "not found"),
        ("directory", "tokenizer.json not found"),  # a directory is read as a Hugging Face tokenizer's
        ("text_file", "is not a SentencePiece model"),
        ("empty_file", "is not a SentencePiece model"),
        ("default_ids", "pad/bos/eos ids -1/1/2, not 0/1/2"),
    ],
)
def test_bad_model_paths_give_a_one_line_config_error(tmp_path, kind, match):
    path = _bad_model(kind, tmp_path)
    with pytest.raises(ConfigError, match=match) as error:
        load_tokenizer(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "vocab_size, match",
    [
        (300, r"vocab_size=300 .* at least \d+"),  # fewer than 4 special + 256 byte + the text's characters
        (100_000, r"vocab_size=100000 .* at most \d+"),  # more pieces than the text can make
        (0, "vocab_size=0 must be a positive integer"),
    ],
)
def test_unreachable_vocab_sizes_give_a_one_line_config_error_and_no_file(tmp_path, vocab_size, match):
    out = tmp_path / "tok.model"
    out.write_bytes(b"previous model")
    with pytest.raises(ConfigError, match=match) as error:
        train_sentencepiece(python_docs("train"), vocab_size, out)
    assert "\n" not in str(error.value)
    assert out.read_bytes() == b"previous model" and list(tmp_path.iterdir()) == [out]


def test_training_into_a_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train_sentencepiece(["some text"] * 10, 300, tmp_path / "missing" / "tok.model")


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffjax.data.tokenizer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_trains_on_the_configured_corpus(tmp_path):
    try:
        from diffjax.data.sources import training_texts

        config = load_config(REPO / "configs" / "tiny.py")
        config.data.data_dir = str(tmp_path / "tfds")
        next(iter(training_texts(config.data)))  # builds the corpus here, once, for the CLI to reuse
    except (ImportError, NotImplementedError):
        pytest.skip("diffjax.data.sources.training_texts is not implemented yet; the CLI has nothing to train on")
    out = tmp_path / "tok.model"
    result = run_cli(
        "train",
        "--config=configs/tiny.py",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--vocab_size={VOCAB_SIZE}",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and f"vocab size {VOCAB_SIZE}" in result.stdout
    assert float(re.search(r"([\d.]+) bytes per token", result.stdout)[1]) > 1.2  # bytes: 1.0
    assert load_tokenizer(str(out)).vocab_size == VOCAB_SIZE


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "--vocab_size=400"], "--out"),
        (["fit", "--vocab_size=400", "--out=tok.model"], "expected the command `train`, got \\['fit'\\]"),
    ],
    ids=["missing_out", "unknown_command"],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, match):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROGRAM}: error: "), result.stderr
    assert re.search(match, lines[0])
    assert not list(tmp_path.iterdir())
