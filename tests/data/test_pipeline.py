import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

from diffjax.config import model_config
from diffjax.data.pipeline import eval_batches, host_documents, make_dataset
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.model import DiffTransformer

TOKENIZER = ByteTokenizer()


@pytest.fixture
def small_corpus(tmp_path):
    """24 distinct documents of 5-120 bytes (some longer than a row) in one .jsonl file."""
    rng = np.random.default_rng(0)
    texts = [f"doc{i}:" + "".join(rng.choice(list("abcdefgh "), size=rng.integers(0, 115))) for i in range(24)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(f'{{"text": "{t}"}}' for t in texts) + "\n")
    return path, texts


def _config(tmp_path, files, **overrides):
    config = load_config(REPO / "configs" / "tiny.py")
    config.data.update(source="text_files", files=str(files), data_dir=str(tmp_path / "tfds"), validation_fraction=0.0)
    config.update(batch_size=4, seq_len=32)
    for key, value in overrides.items():
        target = config.data if key in config.data else config
        target[key] = value
    return config


def _all_batches(config, **process):
    iterator = iter(make_dataset(config, TOKENIZER, "train", **process))
    try:
        return list(iterator)
    finally:
        iterator.close()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_one_epoch_loses_and_duplicates_no_token(tmp_path, small_corpus, packing):
    path, texts = small_corpus
    batches = _all_batches(_config(tmp_path, path, num_epochs=1, packing=packing))
    kept = collections.Counter()
    for batch in batches:
        for key in batch:
            assert batch[key].shape == (4, 32)
        mask = batch["loss_mask"] > 0
        kept.update(zip(batch["inputs"][mask].tolist(), batch["targets"][mask].tolist(), strict=True))
    expected = collections.Counter()
    for text in texts:
        ids = [TOKENIZER.bos_id, *TOKENIZER.encode(text).tolist(), TOKENIZER.eos_id]
        expected.update(itertools.pairwise(ids))
    assert kept == expected


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_segments_and_positions_describe_whole_documents(tmp_path, small_corpus, packing):
    path, _ = small_corpus
    for batch in _all_batches(_config(tmp_path, path, num_epochs=1, packing=packing)):
        for row in range(4):
            segments, positions = batch["segment_ids"][row], batch["positions"][row]
            real = segments > 0
            assert np.all(np.diff(segments[real]) >= 0) and not np.any(real[np.argmin(real) :] & ~real.all())
            assert np.array_equal(batch["loss_mask"][row] > 0, real)
            for segment in np.unique(segments[real]):
                where = segments == segment
                np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
                # Within a document the target of token t is the input of token t + 1.
                np.testing.assert_array_equal(batch["inputs"][row][where][1:], batch["targets"][row][where][:-1])


def test_no_packed_example_attends_across_documents(tmp_path, small_corpus):
    """Through the model's own mask: changing one document leaves the logits of the others unchanged."""
    path, _ = small_corpus
    # Rows that pack two or more documents (which ones depends on TFDS's build order, a hash of the file path).
    packed = [
        (batch, row)
        for batch in _all_batches(_config(tmp_path, path, num_epochs=1))
        for row, ids in enumerate(batch["segment_ids"])
        if len(np.unique(ids[ids > 0])) >= 2
    ]
    assert packed, "no row packs two documents"
    batch, row = packed[0]
    segments = batch["segment_ids"][row]
    cfg = model_config(load_config(REPO / "configs" / "tiny.py"))
    graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
    run = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
    inputs = batch["inputs"][row : row + 1]
    args = (jnp.asarray(batch["positions"][row : row + 1]), jnp.asarray(batch["segment_ids"][row : row + 1]))
    before = np.asarray(run(params, jnp.asarray(inputs), *args))
    first = segments == segments[segments > 0][0]
    changed = np.where(first, (inputs + 7) % 256 + 3, inputs)
    after = np.asarray(run(params, jnp.asarray(changed), *args))
    others = (segments > 0) & ~first[None][0]
    np.testing.assert_array_equal(after[0][others], before[0][others])
    assert not np.allclose(after[0][first], before[0][first])


@pytest.mark.parametrize("prefetch", ["threads", "none"])
@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_restored_iterator_continues_exactly(tmp_path, small_corpus, packing, prefetch):
    path, _ = small_corpus
    config = _config(tmp_path, path, packing=packing, prefetch=prefetch)
    fresh = iter(make_dataset(config, TOKENIZER, "train"))
    reference = [next(fresh) for _ in range(12)]
    fresh.close()

    interrupted = iter(make_dataset(config, TOKENIZER, "train"))
    for _ in range(5):
        next(interrupted)
    state = interrupted.get_state()
    interrupted.close()
    resumed = iter(make_dataset(config, TOKENIZER, "train"))
    resumed.set_state(state)
    for expected in reference[5:]:
        actual = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key])
    resumed.close()


def test_batches_depend_on_the_seed(tmp_path, small_corpus):
    path, _ = small_corpus
    first = _all_batches(_config(tmp_path, path, num_epochs=1, seed=1))[0]["inputs"]
    other = _all_batches(_config(tmp_path, path, num_epochs=1, seed=2))[0]["inputs"]
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_the_data(tmp_path, small_corpus, process_count):
    path, texts = small_corpus
    config = _config(tmp_path, path, num_epochs=1)
    shards = [list(host_documents(config, "train", i, process_count)) for i in range(process_count)]
    assert sorted(text for shard in shards for text in shard) == sorted(texts)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    config.batch_size = 4 * process_count  # every process gets 4 rows of the global batch
    for i in range(process_count):
        batch = next(iter(make_dataset(config, TOKENIZER, "train", process_index=i, process_count=process_count)))
        assert batch["inputs"].shape == (4, 32)


def test_mixture_draws_from_each_source_by_weight(tmp_path, small_corpus):
    path, _ = small_corpus
    config = _config(tmp_path, path, mixture="text_files=3,needles=1")
    config.data.needles.update(context_length=400, num_needles=1, num_queries=1, num_train=64, num_validation=4)
    documents = host_documents(config, "train", 0, 1)
    needles = sum("magic number" in documents[i] for i in range(400))
    assert 70 < needles < 130  # a quarter of 400


def test_eval_batches_are_fixed_and_capped(tmp_path, small_corpus):
    path, _ = small_corpus
    config = _config(tmp_path, path, validation_fraction=0.5, eval_batches=2)
    first, again = eval_batches(config, TOKENIZER), eval_batches(config, TOKENIZER)
    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
