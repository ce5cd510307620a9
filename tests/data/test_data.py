import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffjax.config import ConfigError
from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.data.windows import DocumentStream


def test_corpus_split_is_fixed_disjoint_and_real_text():
    train, validation = python_docs("train"), python_docs("validation")
    assert len(train) > 50 and len(validation) >= 3
    assert not set(train) & set(validation)
    assert sum(map(len, train)) > 300_000
    assert python_docs("validation") == validation
    with pytest.raises(ValueError, match="split='test' is unknown"):
        python_docs("test")


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and (len(ids) == 0 or ids.min() >= tokenizer.offset)
    assert ids.max(initial=0) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == text


def test_windows_restart_segments_and_positions_at_document_boundaries():
    tokenizer = ByteTokenizer()
    stream = DocumentStream(["abc", "de"], tokenizer)  # BOS a b c EOS BOS d e EOS
    batch = stream.windows(np.array([2]), 6)
    np.testing.assert_array_equal(batch["inputs"][0], stream.tokens[2:8])
    np.testing.assert_array_equal(batch["targets"][0], stream.tokens[3:9])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(batch["positions"][0], [2, 3, 4, 0, 1, 2])
    # The EOS of document 1 would predict the BOS of document 2: not a target.
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 1, 1])


def test_batches_are_a_pure_function_of_seed_and_step():
    stream = DocumentStream(python_docs("train"), ByteTokenizer())
    first, again = (stream.random_batch(seed=7, step=3, batch_size=4, seq_len=32) for _ in range(2))
    other = stream.random_batch(seed=7, step=4, batch_size=4, seq_len=32)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["inputs"], other["inputs"])


def test_validation_batches_do_not_overlap_and_report_a_short_split():
    stream = DocumentStream(python_docs("validation"), ByteTokenizer())
    batches = stream.fixed_batches(num_batches=2, batch_size=3, seq_len=16)
    inputs = np.concatenate([b["inputs"] for b in batches])
    np.testing.assert_array_equal(inputs.reshape(-1), stream.tokens[: inputs.size])
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        DocumentStream(["tiny"], ByteTokenizer()).fixed_batches(1, 2, 4)
