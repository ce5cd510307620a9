import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

from diffjax.config import model_config
from diffjax.model import DiffTransformer, parameter_count
from diffjax.train.step import loss_and_count

ATTENTION_TYPES = ["diff", "diff_v2", "standard"]


def _batch(vocab: int, batch: int = 2, length: int = 12) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch, length + 1))
    segments = np.ones((batch, length), np.int32)
    segments[:, length // 2 :] = 2
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(np.broadcast_to(positions, (batch, length))),
        "loss_mask": jnp.ones((batch, length)),
    }


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_gradients_reach_every_parameter(tiny_model_config, attention_type, tie_embeddings):
    cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type, tie_embeddings=tie_embeddings)
    graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
    grads = jax.jit(jax.grad(lambda p: loss_and_count(p, graphdef, _batch(cfg.vocab_size))[0]))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    names = {jax.tree_util.keystr(path) for path, _ in flat}
    if attention_type == "diff":
        assert {n for n in names if "lambda_" in n} and len([n for n in names if "lambda_" in n]) == 4
    for path, grad in flat:
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        # Stacked over layers: every layer's slice must receive gradient.
        per_layer = np.abs(grad).reshape(grad.shape[0], -1).max(axis=1) if "blocks" in str(path) else [grad.max()]
        assert np.all(np.asarray(per_layer) > 0), jax.tree_util.keystr(path)


PAPER_SIZES = {"paper_830m": 830e6, "paper_1_4b": 1.4e9, "paper_2_8b": 2.8e9, "paper_6_8b": 6.8e9, "paper_13b": 13.1e9}


def _count_parameters(config_name: str, attention_type: str = "diff") -> int:
    cfg = model_config(load_config(REPO / "configs" / f"{config_name}.py", attention_type))
    abstract = nnx.eval_shape(lambda: DiffTransformer(cfg, rngs=nnx.Rngs(0)))
    return parameter_count(nnx.state(abstract, nnx.Param), cfg)


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_paper_parameter_counts_match_their_names(name):
    count = _count_parameters(name)
    assert abs(count - PAPER_SIZES[name]) / PAPER_SIZES[name] < 0.03, count
    # The matched baseline has the same count up to the lambda vectors and per-head norm gains.
    assert abs(_count_parameters(name, "standard") - count) / count < 1e-4


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_vocabulary_padding_changes_shapes_and_nothing_else(tiny_model_config, tie_embeddings):
    plain = dataclasses.replace(tiny_model_config, vocab_size=259, tie_embeddings=tie_embeddings)
    padded = dataclasses.replace(plain, vocab_multiple=128)
    assert padded.padded_vocab_size == 384 and plain.padded_vocab_size == 259
    batch = _batch(259)
    outputs = {}
    for cfg in (plain, padded):
        graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
        loss, grads = jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss_and_count(p, g, batch)[0]))(params)
        logits = jax.jit(
            lambda p, g=graphdef: nnx.merge(g, p)(batch["inputs"], batch["positions"], batch["segment_ids"])
        )(params)
        outputs[cfg.vocab_multiple] = (params, grads, loss, logits, parameter_count(params, cfg))
    params, grads, loss, logits, count = outputs[128]
    plain_params, _, plain_loss, plain_logits, plain_count = outputs[1]
    assert logits.shape[-1] == 384 and count == plain_count
    np.testing.assert_allclose(logits[..., :259], plain_logits, rtol=0, atol=1e-6)
    assert np.all(np.asarray(logits[..., 259:]) == np.finfo(np.float32).min)  # probability 0, never sampled
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    vocab = {"embedding": (params["embed"]["embedding"], grads["embed"]["embedding"], 0)}
    if not tie_embeddings:
        vocab["lm_head"] = (params["lm_head"]["kernel"], grads["lm_head"]["kernel"], 1)
    for name, (value, grad, axis) in vocab.items():
        real = np.take(np.asarray(value), np.arange(259), axis=axis)
        expected = plain_params["embed"]["embedding"] if name == "embedding" else plain_params["lm_head"]["kernel"]
        np.testing.assert_array_equal(real, expected, err_msg=name)  # the unpadded model's draw
        assert not np.any(np.take(np.asarray(value), np.arange(259, 384), axis=axis)), name  # zero rows
        assert not np.any(np.take(np.asarray(grad), np.arange(259, 384), axis=axis)), name  # that get no gradient


def test_paper_3b_follows_table_9_literally():
    # 28 x (4 E^2 + 3 E 8192) + 100,288 E with E = 3072, plus norm and lambda vectors.
    count = _count_parameters("paper_3b")
    assert 3.47e9 < count < 3.49e9, count


def test_scanned_stack_does_not_grow_the_program_with_depth(tiny_model_config):
    def program_size(num_layers: int) -> int:
        cfg = dataclasses.replace(tiny_model_config, num_layers=num_layers)
        graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(lambda p: loss_and_count(p, graphdef, _batch(cfg.vocab_size))[0])(params)
        return len(str(jaxpr))

    assert program_size(2) == program_size(8)


@pytest.mark.parametrize("policy", ["minimal", "full", "save_attention"])
def test_remat_policies_do_not_change_the_math(tiny_model_config, policy):
    def loss_and_grads(cfg):
        graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
        return jax.jit(jax.value_and_grad(lambda p: loss_and_count(p, graphdef, _batch(cfg.vocab_size))[0]))(params)

    expected = loss_and_grads(tiny_model_config)
    actual = loss_and_grads(dataclasses.replace(tiny_model_config, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), actual, expected)


@pytest.mark.accelerator
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_packed_documents_equal_documents_run_alone(tiny_model_config, attention_type):
    """Logits of each document in a packed row equal those of the document alone at positions 0..n-1."""
    cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type)
    graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(1)))
    run = jax.jit(lambda params, *inputs: nnx.merge(graphdef, params)(*inputs))
    rng = np.random.default_rng(3)
    lengths = [5, 7, 4]
    documents = [rng.integers(0, cfg.vocab_size, size=n) for n in lengths]
    packed = jnp.asarray(np.concatenate(documents))[None]
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 4), lengths))[None]
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths]))[None]
    packed_logits = np.asarray(run(params, packed, positions, segment_ids))[0]
    start = 0
    for document in documents:
        alone = np.asarray(run(params, jnp.asarray(document)[None]))[0]
        np.testing.assert_allclose(packed_logits[start : start + len(document)], alone, rtol=1e-5, atol=1e-5)
        start += len(document)


def test_bfloat16_compute_keeps_float32_parameters(tiny_model_config):
    cfg = dataclasses.replace(tiny_model_config, dtype=jnp.bfloat16)
    model = DiffTransformer(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(logits, np.float32)))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


@pytest.mark.accelerator
@pytest.mark.parametrize("attention_type", ["diff", "diff_v2"])
def test_the_fused_pallas_kernels_give_the_reference_loss_and_gradients(tiny_model_config, attention_type):
    """The kernels inside the real layers (interpreted on CPU), not only alone: two layers, GQA, packed rows."""

    def loss_and_grads(impl):
        cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type, attention_impl=impl)
        graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
        loss = jax.value_and_grad(lambda p: loss_and_count(p, graphdef, _batch(cfg.vocab_size, length=24))[0])
        return jax.jit(loss)(params)

    expected, actual = loss_and_grads("reference"), loss_and_grads("pallas")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), actual, expected)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_cached_decoding_gives_the_logits_of_the_whole_sequence(tiny_model_config, attention_type):
    cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type)
    graphdef, params = nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))

    @jax.jit
    def prefill_then_steps(params: nnx.State) -> jax.Array:
        model = nnx.merge(graphdef, params)
        logits, cache = model.decode(tokens[:, :6], model.init_cache(2, 16), 0)  # slots past 9 stay empty
        steps = [logits]
        for i in range(6, 9):
            logits, cache = model.decode(tokens[:, i : i + 1], cache, i)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    expected = nnx.merge(graphdef, params)(tokens)
    np.testing.assert_allclose(prefill_then_steps(params), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_probe_sees_the_forward_pass(tiny_model_config, attention_type):
    """`probe` hands `reduce` each layer's output and maps: the last output gives `__call__`'s logits
    (packed documents included), and each layer's effective map keeps a document to itself."""
    cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type)
    model = DiffTransformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg.vocab_size)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden, effective = model.probe(args[0], lambda x, maps: (x, maps.effective), *args[1:])
    assert hidden.shape == (cfg.num_layers, *args[0].shape, cfg.emb_dim)
    np.testing.assert_allclose(model.logits(hidden[-1]), model(*args), rtol=1e-5, atol=1e-5)
    half = args[0].shape[1] // 2
    assert effective.shape[:2] == (cfg.num_layers, 2) and not np.asarray(effective[..., half:, :half]).any()
    assert np.asarray(effective[..., half:, half:]).any()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_probe_rows_are_the_full_maps_rows(tiny_model_config, attention_type):
    """`rows` computes only some queries' rows (R x T, not T x T per layer); they are the dense maps' rows,
    per batch row, logits and masks too."""
    cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type)
    model = DiffTransformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg.vocab_size)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    rows = np.asarray([[3, 0, 9], [11, 5, 5]], np.int32)

    def kept(x, maps):
        return maps.effective, maps.logits, maps.mask

    full = model.probe(args[0], kept, *args[1:])
    picked = model.probe(args[0], kept, *args[1:], rows=rows)
    for whole, part in zip(full, picked, strict=True):
        whole = np.broadcast_to(whole, (whole.shape[0], 2, *whole.shape[2:]))
        expected = np.take_along_axis(whole, rows[None, :, None, :, None], axis=3)
        np.testing.assert_allclose(part, expected, rtol=1e-6, atol=1e-6)
