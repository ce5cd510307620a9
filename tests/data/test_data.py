import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import ByteTokenizer


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


def test_default_vocab_is_the_byte_tokenizers():
    from diffjax.config import base_config

    assert base_config().model.vocab_size == ByteTokenizer.vocab_size
