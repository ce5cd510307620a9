"""Hugging Face `tokenizer.json` tokenizers: byte-level BPEs trained here, other people's files with their own
special ids (from the usual names or `tokenizer_config.json`), loading errors, and the pipeline using them."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_config
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from diffjax.config import ConfigError, check_tokenizer
from diffjax.data.corpus import python_docs
from diffjax.data.pipeline import make_dataset
from diffjax.data.tokenizer import HuggingFaceTokenizer, bytes_per_token, load_tokenizer, train_bpe

from .test_tokenizer import UNUSUAL_TEXTS, run_cli

VOCAB_SIZE = 1024


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tok.json"
    train_bpe(python_docs("train"), VOCAB_SIZE, path)
    return path


@pytest.fixture(scope="module")
def bpe(bpe_path: Path) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(bpe_path)


def _foreign(path: Path, special: list[str], added_later: list[str] = ()) -> Path:
    """A byte-level BPE as other projects ship them: `special` tokens first, `added_later` after the merges
    (Llama 3's `<|begin_of_text|>` is id 128000)."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(python_docs("train")[:5], trainer)
    tokenizer.add_special_tokens(list(added_later))
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def test_a_trained_bpe_reserves_pad_bos_eos_and_has_the_asked_vocab(bpe, bpe_path):
    assert bpe.vocab_size == VOCAB_SIZE
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert [bpe.tokenizer.id_to_token(i) for i in range(3)] == ["<|pad|>", "<|bos|>", "<|eos|>"]
    assert list(bpe_path.parent.iterdir()) == [bpe_path], "no temporary files left behind"


@pytest.mark.parametrize("text", UNUSUAL_TEXTS)
def test_a_trained_bpe_round_trips_unusual_text_exactly(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and not np.isin(ids, [0, 1, 2]).any()
    assert bpe.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_a_trained_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", ["<|pad|>", "a <|eos|> b<|bos|>"])
def test_a_special_tokens_spelling_in_text_is_text_not_its_id(bpe, text):
    for tokenizer in (bpe, pickle.loads(pickle.dumps(bpe))):
        ids = tokenizer.encode(text)
        assert not {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} & set(ids.tolist())
        assert tokenizer.decode(ids) == text


def test_a_trained_bpe_compresses_held_out_text_pickles_and_drops_special_ids(bpe):
    assert bytes_per_token(bpe, python_docs("validation")) > 2.5  # the byte tokenizer's is 1.0
    clone = pickle.loads(pickle.dumps(bpe))
    np.testing.assert_array_equal(clone.encode("pickled"), bpe.encode("pickled"))
    assert bpe.decode([1, *bpe.encode("some text"), 2, 0, VOCAB_SIZE + 5]) == "some text"


def test_training_is_deterministic(bpe_path, tmp_path):
    again = tmp_path / "again.json"
    train_bpe(python_docs("train"), VOCAB_SIZE, again)
    assert again.read_bytes() == bpe_path.read_bytes()


def test_load_tokenizer_takes_the_file_or_its_directory(bpe_path, bpe, tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(bpe_path.read_bytes())
    for spec in (str(bpe_path), str(directory)):
        loaded = load_tokenizer(spec)
        assert isinstance(loaded, HuggingFaceTokenizer) and loaded.vocab_size == VOCAB_SIZE
        np.testing.assert_array_equal(loaded.encode("hello"), bpe.encode("hello"))


def test_special_ids_come_from_the_usual_names(tmp_path):
    sentencepiece_style = HuggingFaceTokenizer(_foreign(tmp_path / "a.json", ["<unk>", "<s>", "</s>"]))
    assert (sentencepiece_style.bos_id, sentencepiece_style.eos_id, sentencepiece_style.pad_id) == (1, 2, 2)
    llama3_style = HuggingFaceTokenizer(
        _foreign(tmp_path / "b.json", [], ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"])
    )
    assert (llama3_style.bos_id, llama3_style.eos_id, llama3_style.pad_id) == (400, 401, 402)
    assert llama3_style.vocab_size == 403
    neox_style = HuggingFaceTokenizer(_foreign(tmp_path / "c.json", ["<|endoftext|>", "<|padding|>"]))
    assert (neox_style.bos_id, neox_style.eos_id, neox_style.pad_id) == (0, 0, 1)


def test_tokenizer_config_json_beside_the_file_names_the_special_tokens(tmp_path):
    path = _foreign(tmp_path / "model" / "tokenizer.json", ["<s>", "</s>", "<unk>"])
    config = {"bos_token": {"content": "</s>", "special": True}, "eos_token": "<s>", "pad_token": "<unk>"}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(path.parent))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 0, 2)


def test_the_pipeline_starts_every_document_with_the_tokenizers_own_bos(tmp_path):
    path = _foreign(tmp_path / "llama3.json", [], ["<|begin_of_text|>", "<|end_of_text|>"])
    documents = tmp_path / "docs.jsonl"  # short documents, so that rows hold several
    documents.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * i}) + "\n" for i in range(30)))
    config = load_config(REPO / "configs" / "tiny.py")
    config.data.update(tokenizer=str(path), data_dir=str(tmp_path / "tfds"), source="text_files")
    config.data.update(files=str(documents), validation_fraction=0.0)
    config.update(batch_size=4, seq_len=64)
    tokenizer = load_tokenizer(config.data.tokenizer)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=259 is smaller than the tokenizer's 402 ids"):
        check_tokenizer(config, tokenizer)
    config.model.vocab_size = 512  # padded beyond the tokenizer, as the paper's 100,288
    check_tokenizer(config, tokenizer)
    iterator = iter(make_dataset(config, tokenizer, "train"))
    batch = next(iterator)
    iterator.close()
    starts = np.diff(batch["segment_ids"], axis=1, prepend=batch["segment_ids"][:, :1]) != 0
    starts &= batch["segment_ids"] > 0  # documents starting inside a row (a row may begin mid-document)
    assert starts.sum() > 0 and set(batch["inputs"][starts].tolist()) == {400}  # BOS opens every document
    assert 401 in batch["targets"][batch["loss_mask"] > 0]  # EOS closes one
    assert batch["inputs"].max() < 402


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing", "tokenizer file .* not found; set data.tokenizer to a tokenizer.json"),
        ("not_a_tokenizer", "is not a Hugging Face tokenizer file"),
        ("no_bos", r"has no BOS token under the usual names .*; name it as bos_token in a tokenizer_config.json"),
        ("config_names_a_missing_token", "tokenizer_config.json names bos_token='<start>', which .* does not have"),
    ],
)
def test_bad_tokenizer_files_give_a_one_line_config_error(tmp_path, kind, match):
    path = tmp_path / "tokenizer.json"
    if kind == "not_a_tokenizer":
        path.write_text('{"hello": 1}')
    if kind == "no_bos":
        _foreign(path, ["[PAD]", "[UNK]"])
    if kind == "config_names_a_missing_token":
        _foreign(path, ["<s>", "</s>"])
        (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<start>"}')
    with pytest.raises(ConfigError, match=match) as error:
        load_tokenizer(str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("vocab_size", "match"),
    [(100, "vocab_size=100 must be at least 259"), (100_000, r"vocab_size=100000 is more tokens .* at most \d+")],
)
def test_unreachable_bpe_vocab_sizes_are_refused_and_write_nothing(tmp_path, vocab_size, match):
    with pytest.raises(ConfigError, match=match):
        train_bpe(python_docs("train")[:3], vocab_size, tmp_path / "tok.json")
    assert not list(tmp_path.iterdir())


def test_cli_trains_a_bpe_for_a_json_out_and_refuses_other_suffixes(tmp_path):
    out = tmp_path / "tok.json"
    common = ["--config=configs/tiny.py", f"--config.data.data_dir={tmp_path / 'tfds'}", "--vocab_size=600"]
    result = run_cli("train", *common, f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and "vocab size 600" in result.stdout
    assert load_tokenizer(str(out)).vocab_size == 600
    result = run_cli("train", *common, f"--out={tmp_path / 'tok.txt'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "must end in .model (SentencePiece) or .json" in result.stderr
    assert not (tmp_path / "tok.txt").exists()
