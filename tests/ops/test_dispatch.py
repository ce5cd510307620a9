"""The attention dispatcher: `auto` picks an implementation that works, explicit requests are obeyed or refused
with the reason, and every implementation keeps padding rows at exactly zero with zero gradients."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from diffjax.config import ConfigError, validate
from diffjax.ops import reference
from diffjax.ops.dispatch import IMPLEMENTATIONS, AttentionCore, AttentionImplError, resolve

RUNNABLE = IMPLEMENTATIONS  # pallas runs interpreted on CPU


def _diff_inputs(length: int, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    q1, q2 = (rng.standard_normal((2, length, 4, 8)) for _ in range(2))
    k1, k2 = (rng.standard_normal((2, length, 2, 8)) for _ in range(2))
    v = rng.standard_normal((2, length, 2, 16))
    return tuple(jnp.asarray(x, dtype) for x in (q1, q2, k1, k2, v, 0.6))


def test_auto_on_cpu_is_blockwise():
    assert resolve("auto", jnp.float32, "cpu") == "blockwise"


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_on_accelerators_is_the_fused_kernel(platform):
    assert resolve("auto", jnp.bfloat16, platform) == "pallas"


WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # as in a jax release that removed the backend
import jax.numpy as jnp
from diffjax.ops import pallas
from diffjax.ops.dispatch import resolve
print(resolve("auto", jnp.bfloat16, "gpu"), resolve("auto", jnp.bfloat16, "tpu"))
try:
    pallas.kernel_for("gpu", 128, jnp.bfloat16)
except ValueError as error:
    print(error)
"""


def test_without_the_triton_backend_auto_takes_blockwise_on_gpus_and_pallas_names_the_reason():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    choices, reason = result.stdout.splitlines()
    assert choices == "blockwise pallas"
    assert reason.startswith(f"no Pallas attention kernels for platform 'gpu' (jax {jax.__version__} has no Pallas")


@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_an_explicit_choice_is_obeyed_on_every_platform(impl):
    for platform in ("cpu", "gpu", "tpu"):
        assert resolve(impl, jnp.float32, platform) == impl


def test_unknown_implementation_and_integer_inputs_are_refused():
    with pytest.raises(AttentionImplError, match="unknown; choose one of"):
        resolve("flash", jnp.float32, "cpu")
    with pytest.raises(AttentionImplError, match="floating-point inputs, got int32"):
        resolve("auto", jnp.int32, "cpu")


def test_pallas_tiles_that_are_not_powers_of_two_are_refused_not_replaced():
    with pytest.raises(
        AttentionImplError, match="attention_impl='pallas': attention block_q=96 must be a power of two"
    ):
        AttentionCore("pallas", 96, 128).diff_attention(*_diff_inputs(8))


@pytest.mark.parametrize(("dtype", "length"), [(jnp.float32, 130), (jnp.bfloat16, 7), (jnp.float16, 1)])
def test_auto_on_cpu_runs_and_matches_the_reference(dtype, length):
    """`auto` never picks an implementation that fails: forward and gradients run and agree with the reference."""
    args = _diff_inputs(length, dtype)
    core = AttentionCore("auto", 64, 32)

    def loss(fn, args):
        return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

    ours, ours_grads = jax.jit(jax.value_and_grad(lambda a: loss(core.diff_attention, a)))(args)
    theirs = jax.jit(lambda a: loss(reference.diff_attention, a))(args)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in ours_grads)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-4 if dtype == jnp.float32 else 5e-2)
    plain = jax.jit(core.attention)(args[0], args[2], args[4])
    np.testing.assert_allclose(
        np.asarray(plain, np.float32),
        np.asarray(reference.attention(args[0], args[2], args[4]), np.float32),
        rtol=1e-4 if dtype == jnp.float32 else 5e-2,
        atol=1e-4 if dtype == jnp.float32 else 5e-2,
    )


@pytest.mark.parametrize("impl", RUNNABLE)
@pytest.mark.parametrize("differential", [True, False])
def test_fully_masked_rows_give_zeros_and_zero_gradients_through_the_dispatcher(impl, differential):
    args = _diff_inputs(10)
    if not differential:
        args = (args[0], args[2], args[4])
    core = AttentionCore(impl, 4, 8)
    fn = core.diff_attention if differential else core.attention
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0, 0, 0, 0, 0], [0] * 10])

    out = jax.jit(fn)(*args, segment_ids)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(fn(*a, segment_ids)))))(args)
    out = np.asarray(out)
    assert np.all(out[0, 5:] == 0) and np.all(out[1] == 0) and np.all(np.abs(out[0, :5]) > 0)
    for grad in grads[: len(args) - differential]:  # arrays with a time axis; the last differential arg is lam
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[0, 5:] == 0) and np.all(grad[1] == 0)
        assert np.any(grad[0, :5] != 0)
    if differential:
        assert np.isfinite(float(grads[-1])) and float(grads[-1]) != 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attention_impl", "flash", "model.attention_impl='flash' is unknown; choose one of"),
        ("attention_block_q", 96, "model.attention_block_q=96 must be a power of two"),
        ("attention_block_k", -8, "model.attention_block_k=-8 must be a power of two"),
    ],
)
def test_config_rejects_unusable_attention_settings_in_one_line(key, value, message):
    config = load_config(REPO / "configs" / "tiny.py")
    config.model[key] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
