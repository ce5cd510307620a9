"""The JAX attention layers against the independent float64 NumPy reference (SPEC sections 1, 3, 4).

Every parameter is redrawn away from its initialisation (random kernels, norm gains and lambda
vectors), so a wrong head pairing, RoPE convention, lambda or norm placement changes the output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax.model.attention import DiffAttention, DiffAttentionV2, LayerConstants, StandardAttention
from diffjax.model.model_config import ModelConfig
from diffjax.ops.reference import causal_mask

from . import numpy_reference as ref

EMB_DIM, NUM_HEADS, THETA, EPS = 64, 4, 10_000.0, 1e-6  # head_dim d = 8
LAYERS = {"diff": DiffAttention, "diff_v2": DiffAttentionV2, "standard": StandardAttention}
KV_HEADS = [4, 2, 1]  # MHA, GQA n_rep 2, GQA n_rep 4

# Two packed rows: 3 and 2 documents, then a padded tail (segment 0).
SEGMENTS = np.array(
    [
        [1] * 5 + [2] * 7 + [3] * 2 + [0] * 2,
        [1] * 9 + [2] * 4 + [0] * 3,
    ],
    dtype=np.int32,
)
BATCH, LENGTH = SEGMENTS.shape


def restarted_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Per-document positions 0, 1, 2, ... restarting at every segment change (padding gets 0)."""
    positions = np.zeros_like(segment_ids)
    for row, segments in enumerate(segment_ids):
        for t in range(1, len(segments)):
            if segments[t] == segments[t - 1] and segments[t] != 0:
                positions[row, t] = positions[row, t - 1] + 1
    return positions


def param_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) for a redrawn parameter; fails on a parameter this test does not know about."""
    if name.endswith("kernel"):
        return 0.0, shape[0] ** -0.5  # unit-variance activations, so softmaxes are neither flat nor one-hot
    if name.startswith("lambda_"):
        return 0.0, 0.3  # <lq, lk> ~ 0.25, so lambda is clearly not lambda_init
    if name == "subln/scale":
        return 1.0, 0.5
    raise AssertionError(f"unexpected parameter {name}: teach this test how to randomise it")


def make_layer(
    attention_type: str, num_kv_heads: int, subln_affine: bool = True, seed: int = 0
) -> tuple[nnx.Module, dict[str, np.ndarray]]:
    """A layer with every parameter redrawn, and the same (float32-rounded) values in float64 by name."""
    cfg = ModelConfig(
        vocab_size=16,
        emb_dim=EMB_DIM,
        num_layers=6,
        num_heads=NUM_HEADS,
        num_kv_heads=num_kv_heads,
        mlp_dim=4 * EMB_DIM,
        attention_type=attention_type,
        subln_affine=subln_affine,
        rope_theta=THETA,
        rms_norm_eps=EPS,
    )
    layer = LAYERS[attention_type](cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = {}
    for path, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            name = "/".join(map(str, path))
            mean, std = param_std(name, var.shape)
            var[...] = jnp.asarray(mean + std * rng.standard_normal(var.shape), jnp.float32)
            params[name] = np.asarray(var[...], np.float64)
    return layer, params


def reference(
    attention_type: str,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    positions: np.ndarray,
    segment_ids: np.ndarray | None,
    layer_index: int,
    num_kv_heads: int,
) -> np.ndarray:
    """The float64 reference for `attention_type`, fed the layer's parameters."""
    common = dict(
        wq=params["q_proj/kernel"],
        wk=params["k_proj/kernel"],
        wv=params["v_proj/kernel"],
        wo=params["o_proj/kernel"],
        num_heads=NUM_HEADS,
        num_kv_heads=num_kv_heads,
        theta=THETA,
    )
    if attention_type == "standard":
        return ref.standard_attention(x, positions, segment_ids, **common)
    if attention_type == "diff_v2":
        return ref.diff_attention_v2(x, positions, segment_ids, w_lambda=params["lambda_proj/kernel"], **common)
    lambdas = {name: params[name] for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    return ref.diff_attention_v1(
        x,
        positions,
        segment_ids,
        subln_gain=params.get("subln/scale"),
        layer_index=layer_index,
        eps=EPS,
        **lambdas,
        **common,
    )


def run_layer(
    layer: nnx.Module, x: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray | None, layer_index: int
) -> np.ndarray:
    """Call the JAX layer in float32 with the layer constants of `layer_index`."""
    init = ref.lambda_init(layer_index)
    constants = LayerConstants(lambda_init=jnp.float32(init), output_scale=jnp.float32(1.0 - init))
    segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this tests the math, not matmul precision
        out = layer(jnp.asarray(x, jnp.float32), jnp.asarray(positions, jnp.int32), segments, constants)
    return np.asarray(out)


def inputs(masking: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x (float32 values held in float64), positions and segment ids for `causal` or `packed` rows."""
    x = np.random.default_rng(seed).standard_normal((BATCH, LENGTH, EMB_DIM)).astype(np.float32).astype(np.float64)
    if masking == "causal":
        return x, np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)), None
    return x, restarted_positions(SEGMENTS), SEGMENTS


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """1e-5 relative, with an absolute floor of 1e-5 times the output scale (max |expected|).

    float32 round-off (eps 1.2e-7) accumulates over the E-term projections and T-term softmax sums and
    is relative to the summands, not to each result, so outputs that are small through cancellation
    need the floor. Measured here (2 CPU cores): standard and v2 err <= 4e-7 of the scale, v1 up to 9e-7,
    and 3.6e-6 for v1 with n_rep 4, packed, layer 5, where lambda = 1.10: at the second token of a
    document (A1 - lambda A2) V is 10x smaller than A1 V in one head and the per-head RMSNorm scales it
    back up, amplifying round-off 10x (a float32 NumPy run of the reference shows the same error; with
    every cast in float64 the layer matches to 1e-15). Mutating the reference (GPT-J RoPE, sqrt(2d) scale,
    RMSNorm eps 1e-5, gain dropped) fails these comparisons, so the floor still catches convention errors.
    """
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.accelerator
@pytest.mark.parametrize("subln_affine", [True, False])
@pytest.mark.parametrize("layer_index", [0, 5])
@pytest.mark.parametrize("masking", ["causal", "packed"])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_diff_v1_matches_reference(num_kv_heads: int, masking: str, layer_index: int, subln_affine: bool) -> None:
    layer, params = make_layer("diff", num_kv_heads, subln_affine)
    assert ("subln/scale" in params) == subln_affine
    x, positions, segment_ids = inputs(masking)
    expected = reference("diff", params, x, positions, segment_ids, layer_index, num_kv_heads)
    assert_close(run_layer(layer, x, positions, segment_ids, layer_index), expected)


@pytest.mark.accelerator
@pytest.mark.parametrize("masking", ["causal", "packed"])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("attention_type", ["diff_v2", "standard"])
def test_v2_and_standard_match_reference(attention_type: str, num_kv_heads: int, masking: str) -> None:
    layer, params = make_layer(attention_type, num_kv_heads)
    x, positions, segment_ids = inputs(masking)
    expected = reference(attention_type, params, x, positions, segment_ids, 5, num_kv_heads)
    assert_close(run_layer(layer, x, positions, segment_ids, 5), expected)


def test_lambda_init_schedule() -> None:
    """The per-layer constants the model scans over follow SPEC 1 (the layer tests take them from the reference)."""
    cfg = ModelConfig(vocab_size=16, emb_dim=EMB_DIM, num_layers=8, num_heads=NUM_HEADS, num_kv_heads=2, mlp_dim=64)
    np.testing.assert_allclose(cfg.lambda_inits(), [ref.lambda_init(layer) for layer in range(8)], rtol=1e-15)


@pytest.mark.parametrize("attention_type", list(LAYERS))
def test_padding_rows_are_exactly_zero(attention_type: str) -> None:
    """SPEC 4: a fully masked (segment 0) row gives zeros, never NaN, forward and backward."""
    layer, _ = make_layer(attention_type, num_kv_heads=2)
    x, positions, segment_ids = inputs("packed")
    out = run_layer(layer, x, positions, segment_ids, 5)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[SEGMENTS == 0], 0.0)
    assert np.abs(out[SEGMENTS != 0]).min() > 0  # the real tokens are not zeroed with them

    constants = LayerConstants(lambda_init=jnp.float32(0.5), output_scale=jnp.float32(0.5))
    loss = lambda x: layer(x, jnp.asarray(positions), jnp.asarray(segment_ids), constants).sum()  # noqa: E731
    grad = jax.jit(jax.grad(loss))(jnp.asarray(x, jnp.float32))  # jit: 5x faster than eager on CPU
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("attention_type", list(LAYERS))
def test_no_cross_document_or_future_leak(attention_type: str) -> None:
    """Changing token 7 (document 2 of row 0) leaves earlier tokens, other documents and other rows bit-identical."""
    layer, _ = make_layer(attention_type, num_kv_heads=2)
    x, positions, segment_ids = inputs("packed")
    changed = x.copy()
    changed[0, 7] = np.random.default_rng(2).standard_normal(EMB_DIM).astype(np.float32)
    before = run_layer(layer, x, positions, segment_ids, 5)
    after = run_layer(layer, changed, positions, segment_ids, 5)

    unaffected = np.ones((BATCH, LENGTH), dtype=bool)
    unaffected[0, 7:12] = False  # token 7 and the later tokens of its document
    np.testing.assert_array_equal(after[unaffected], before[unaffected])
    assert (np.abs(after[0, 7:12] - before[0, 7:12]).max(axis=-1) > 1e-3).all()  # the change does propagate


@pytest.mark.parametrize("attention_type", list(LAYERS))
def test_packed_document_equals_document_alone(attention_type: str) -> None:
    """With restarted positions, document 2 of row 0 packed gives what it gives alone in its own row."""
    layer, _ = make_layer(attention_type, num_kv_heads=2)
    x, positions, segment_ids = inputs("packed")
    packed = run_layer(layer, x, positions, segment_ids, 5)[0, 5:12]
    alone_x = x[:1, 5:12]
    alone = run_layer(layer, alone_x, np.arange(7, dtype=np.int32)[None], None, 5)[0]
    assert_close(packed, alone)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("attention_type", list(LAYERS))
def test_maps_are_the_ones_spec_defines(attention_type: str, num_kv_heads: int) -> None:
    """`maps` (what evaluation inspects) against SPEC's maps built in float64 from the layer's own q and k:
    A per head (standard), A1 and lambda A2 (v1), the pair (2p, 2p+1) with lambda_t (v2), and the logits."""
    layer, params = make_layer(attention_type, num_kv_heads)
    x, positions, segment_ids = inputs("packed")
    init = ref.lambda_init(5)
    x32 = jnp.asarray(x, jnp.float32)
    with jax.default_matmul_precision("highest"):
        qkv = layer.project(x32, jnp.asarray(positions))
        constants = LayerConstants(lambda_init=jnp.float32(init), output_scale=jnp.float32(1.0 - init))
        maps = layer.maps(x32, qkv, constants, causal_mask(jnp.asarray(segment_ids), LENGTH))
    q, k = (np.asarray(y, np.float64) for y in qkv[:2])
    allowed = ref.allowed(segment_ids, BATCH, LENGTH)
    num_q, num_k = q.shape[2], k.shape[2]
    if attention_type == "diff":  # branch b of query head p reads key head b Hkv + p // (H / Hkv)
        key_head = [
            (j // NUM_HEADS) * num_kv_heads + (j % NUM_HEADS) // (NUM_HEADS // num_kv_heads) for j in range(num_q)
        ]
    else:
        key_head = [j // (num_q // num_k) for j in range(num_q)]
    probs = np.stack([ref.softmax_probs(q[:, :, j], k[:, :, key_head[j]], allowed) for j in range(num_q)], axis=1)
    logits = np.stack([q[:, :, j] @ k[:, :, key_head[j]].transpose(0, 2, 1) for j in range(num_q)], axis=1)
    if attention_type == "standard":
        positive, negative = probs, None
    elif attention_type == "diff":
        lam = (
            np.exp(params["lambda_q1"] @ params["lambda_k1"]) - np.exp(params["lambda_q2"] @ params["lambda_k2"]) + init
        )
        positive, negative = probs[:, :NUM_HEADS], lam * probs[:, NUM_HEADS:]
    else:
        lam = 1.0 / (1.0 + np.exp(-(x @ params["lambda_proj/kernel"])))  # [B, T, H]
        positive, negative = probs[:, 0::2], lam.transpose(0, 2, 1)[..., None] * probs[:, 1::2]

    assert_close(np.asarray(maps.positive), positive)
    if negative is None:
        assert maps.negative is None
        np.testing.assert_array_equal(np.asarray(maps.effective), np.asarray(maps.positive))
    else:
        assert_close(np.asarray(maps.negative), negative)
        assert_close(np.asarray(maps.effective), positive - negative)
    seen = np.broadcast_to(allowed[:, None], logits.shape)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(maps.mask), seen.shape), seen)
    assert_close(np.asarray(maps.logits)[seen], logits[seen] / np.sqrt(q.shape[-1]))
