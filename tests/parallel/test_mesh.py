import jax
import pytest

from diffjax.config import ConfigError
from diffjax.parallel.mesh import cpu_device_count, initialize_distributed, make_mesh, resolve_shape
from diffjax.parallel.sharding import DEFAULT_RULES, logical_spec


def test_one_axis_fills_the_devices():
    assert resolve_shape((1, -1, 1), 8) == (1, 8, 1)
    assert resolve_shape((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "shape,message",
    [((3, -1, 1), "cannot fill 8 devices"), ((2, 2, 1), "holds 4 devices but 8"), ((-1, -1, 1), "at most one")],
)
def test_bad_mesh_shapes_are_one_line_errors(shape, message):
    with pytest.raises(ConfigError, match=message):
        resolve_shape(shape, 8)


def test_the_default_mesh_uses_every_device_with_auto_axes():
    mesh = make_mesh((1, -1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_names_map_through_the_rules():
    assert logical_spec(("act_batch", "act_length"), DEFAULT_RULES) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None
    )
    with pytest.raises(ValueError, match="no sharding rule for logical axes"):
        logical_spec(("nope",), DEFAULT_RULES)


@pytest.mark.parametrize(
    "env,joins",
    [
        ({}, False),  # one host: nothing to join
        ({"DIFFJAX_MULTIHOST": "1"}, True),  # a Cloud TPU VM slice (tpu_setup/launch.sh): JAX reads the metadata
        ({"SLURM_NTASKS": "4"}, True),
        ({"TPU_WORKER_HOSTNAMES": "host-0"}, False),
    ],
)
def test_detected_clusters_join_through_jax_auto_detection(monkeypatch, env, joins):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TPU_WORKER_HOSTNAMES", "DIFFJAX_MULTIHOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    initialize_distributed()
    assert calls == ([{"initialization_timeout": 300}] if joins else [])


@pytest.mark.parametrize(
    "shape, batch, cores, count",
    [
        ((1, -1, 1), 16, 2, 2),  # the default: a device per core
        ((1, -1, 1), 16, 1, 1),
        ((1, -1, 1), 12, 8, 6),  # as many as split the batch into whole rows
        ((1, -1, 1), 7, 4, 1),
        ((-1, 1, 2), 8, 8, 8),  # tensor-parallel devices share rows: 4 x 2
        ((-1, 1, 2), 8, 3, 2),  # a multiple of the fixed axis
        ((1, 1, 1), 16, 2, 1),  # a fixed shape keeps its device count
        ((2, 2, 2), 16, 2, 1),  # more than the cores: left to make_mesh to refuse
    ],
)
def test_cpu_device_count_is_the_most_devices_the_mesh_and_batch_can_use(shape, batch, cores, count):
    assert cpu_device_count(shape, batch, cores) == count
