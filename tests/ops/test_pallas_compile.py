"""The fused kernels compile for real hardware without it: Mosaic through libtpu topologies (inside the sharded
train step, where `attention_impl=auto` must pick them) and Triton through `jax.export` for CUDA."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, load_config
from jax.sharding import NamedSharding, PartitionSpec

from diffjax.ops import pallas
from diffjax.ops.dispatch import AttentionCore, AttentionImplError
from diffjax.parallel.mesh import make_mesh
from diffjax.parallel.sharding import DEFAULT_RULES, activation_sharding
from diffjax.train.aot import BATCH_DTYPES, topology_devices
from diffjax.train.state import make_trainer

requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)
KERNEL_NAMES = ("diff_flash_forward", "diff_flash_dkv", "diff_flash_dq")


def _tpu_mesh(topology: str):
    return make_mesh((1, 2, 2), devices=topology_devices(topology))


@requires_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_forward_and_backward_compile_for_tpu_inside_a_sharded_jit(topology):
    """T = 4096, d = 128, bfloat16; batch over fsdp and heads over tensor, so the kernels run under shard_map."""
    mesh = _tpu_mesh(topology)
    core = AttentionCore("pallas")
    per_head = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((2, 4096, 4, 128), jnp.bfloat16, sharding=per_head)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16, sharding=per_head)
    v = jax.ShapeDtypeStruct((2, 4096, 2, 256), jnp.bfloat16, sharding=per_head)
    lam = jax.ShapeDtypeStruct((), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    segments = jax.ShapeDtypeStruct((2, 4096), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))

    def loss(q1, q2, k1, k2, v, lam, segment_ids):
        with activation_sharding(mesh, DEFAULT_RULES):
            out = core.diff_attention(q1, q2, k1, k2, v, lam, segment_ids)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))).lower(q, q, kv, kv, v, lam, segments)
    assert all(name in lowered.as_text() for name in KERNEL_NAMES)
    lowered.compile()


@requires_libtpu
def test_the_train_step_for_a_tpu_mesh_chooses_the_kernels_automatically():
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(num_kv_heads=2, vocab_size=512)
    trainer = make_trainer(config, _tpu_mesh("v5e:2x2"))
    shape = (config.batch_size, config.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding) for k, dtype in BATCH_DTYPES.items()
    }
    text = trainer.train_step.lower(trainer.abstract_state, batch).as_text()
    assert all(name in text for name in KERNEL_NAMES), "attention_impl=auto did not choose the Pallas kernels"


@pytest.mark.skipif("gpu" not in pallas.KERNELS, reason="this jax has no Pallas Triton backend")
def test_the_gpu_kernels_lower_to_triton_forward_and_backward():
    from .triton_export import TRITON, cuda_mlir

    kernel = pallas.kernel_for("gpu", 128, jnp.bfloat16, 64, 64)
    q = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 4096, 2, 256), jnp.bfloat16)
    lam = jax.ShapeDtypeStruct((), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

    def loss(q1, q2, k1, k2, v, lam, segment_ids):
        out = pallas.diff_attention(q1, q2, k1, k2, v, lam, segment_ids, kernel=kernel)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    text = cuda_mlir(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), q, q, kv, kv, v, lam, segments)
    assert text.count(TRITON) == 3  # forward, dK/dV, dQ


@requires_libtpu
@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_heads_that_do_not_split_over_tensor_refuse_pallas_or_make_auto_take_blockwise(impl):
    mesh = _tpu_mesh("v5e:2x2")
    q = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 1, 128), jnp.bfloat16)  # one kv head cannot split two ways
    v = jax.ShapeDtypeStruct((2, 256, 1, 256), jnp.bfloat16)

    def attend(q1, q2, k1, k2, v):
        with activation_sharding(mesh, DEFAULT_RULES):
            return AttentionCore(impl).diff_attention(q1, q2, k1, k2, v, jnp.bfloat16(0.5))

    if impl == "pallas":
        with pytest.raises(
            AttentionImplError, match=r"splits heads 2 ways over mesh axes 'tensor', but an input has 1"
        ):
            jax.jit(attend).lower(q, q, kv, kv, v)
    else:
        text = jax.jit(attend).lower(q, q, kv, kv, v).as_text()
        assert not any(name in text for name in KERNEL_NAMES)
