import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.ops import attention, diff_attention


def _inputs(batch=2, length=6, heads=4, kv_heads=2, width=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q1, q2 = (jax.random.normal(k, (batch, length, heads, width)) for k in keys[:2])
    k1, k2 = (jax.random.normal(k, (batch, length, kv_heads, width)) for k in keys[2:4])
    v = jax.random.normal(keys[4], (batch, length, kv_heads, 2 * width))
    return q1, q2, k1, k2, v


def test_fully_padded_rows_give_zeros_and_zero_gradients():
    q1, q2, k1, k2, v = _inputs()
    segment_ids = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    lam = jnp.float32(0.7)

    def total(*args):
        return diff_attention(*args, segment_ids).sum()

    out = diff_attention(q1, q2, k1, k2, v, lam, segment_ids)
    assert np.all(np.asarray(out[0, 3:]) == 0) and np.all(np.asarray(out[1]) == 0)
    assert np.all(np.abs(np.asarray(out[0, :3])) > 0)
    grads = jax.grad(total, argnums=(0, 1, 2, 3, 4, 5))(q1, q2, k1, k2, v, lam)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grads[0][1]) == 0) and np.all(np.asarray(grads[4][1]) == 0)

    plain = attention(q1, k1, v, segment_ids)
    assert np.all(np.asarray(plain[0, 3:]) == 0) and np.all(np.isfinite(np.asarray(plain)))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_queries_read_their_own_kv_head(kv_heads):
    """GQA without repeating K/V equals ordinary attention over explicitly repeated K/V heads."""
    q1, q2, k1, k2, v = _inputs(kv_heads=kv_heads)
    rep = q1.shape[2] // kv_heads
    grouped = diff_attention(q1, q2, k1, k2, v, jnp.float32(0.3))
    repeated = diff_attention(q1, q2, *(jnp.repeat(x, rep, axis=2) for x in (k1, k2, v)), jnp.float32(0.3))
    np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)


def test_no_segment_ids_means_one_causal_document():
    q1, q2, k1, k2, v = _inputs()
    ones = jnp.ones(q1.shape[:2], jnp.int32)
    np.testing.assert_array_equal(
        diff_attention(q1, q2, k1, k2, v, jnp.float32(0.5)), diff_attention(q1, q2, k1, k2, v, jnp.float32(0.5), ones)
    )
    # Causal: the first query sees only the first key, so its output is that value's difference.
    out = attention(q1, k1, v)
    np.testing.assert_allclose(out[:, 0], jnp.repeat(v[:, 0], 2, axis=1), rtol=1e-6)
