"""The device mesh (`data`, `fsdp`, `tensor`) and multi-host start-up."""

import itertools
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from diffjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape") -> tuple[int, ...]:
    """`shape` with its one -1 filled so the product is `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{key}={shape} must give {len(MESH_AXES)} sizes for {MESH_AXES}, at most one of them -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"{key}={shape} cannot fill {num_devices} devices: {num_devices} % {known} != 0")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"{key}={shape} holds {math.prod(shape)} devices but {num_devices} are present")
    return shape


def cpu_device_count(shape: Sequence[int], batch_size: int, cores: int) -> int:
    """The most devices, up to one per core, that mesh `shape` can use with whole rows of a `batch_size`
    batch on each (the batch is split over `data` x `fsdp`); 1 when none fits."""
    fits = [1]
    for count in range(2, cores + 1):
        try:
            data, fsdp, _ = resolve_shape(shape, count)
        except ConfigError:
            continue
        if batch_size % (data * fsdp) == 0:
            fits.append(count)
    return fits[-1]


def use_cpu_cores(shape: Sequence[int], batch_size: int) -> None:
    """Before any backend starts, give the CPU backend `cpu_device_count` devices (a GPU/TPU backend ignores
    the setting). One device runs a training step's many small ops mostly on one thread; a device per core
    splits the batch between the cores (docs/benchmarks.md). A count chosen already
    (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, `JAX_NUM_CPU_DEVICES`) is left alone."""
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if not chosen and not os.environ.get("JAX_NUM_CPU_DEVICES"):
        count = cpu_device_count(shape, batch_size, len(os.sched_getaffinity(0)))
        jax.config.update("jax_num_cpu_devices", count)


def make_mesh(shape: Sequence[int], dcn_shape: Sequence[int] = (1, 1, 1), devices: Sequence | None = None) -> Mesh:
    """A mesh with Auto axis types (GSPMD propagates shardings between our explicit annotations).

    `dcn_shape` > 1 builds a hybrid mesh: `shape` inside each slice (ICI), `dcn_shape` across slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    num_slices = math.prod(resolve_shape(dcn_shape, math.prod(dcn_shape), "mesh.dcn_shape"))
    if num_slices == 1:
        return jax.make_mesh(resolve_shape(shape, len(devices)), MESH_AXES, axis_types, devices=devices)
    if len(devices) % num_slices:
        raise ConfigError(f"mesh.dcn_shape={tuple(dcn_shape)} does not divide the {len(devices)} devices")
    ici = resolve_shape(shape, len(devices) // num_slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn_shape), devices)
    return Mesh(np.asarray(grid), MESH_AXES, axis_types=axis_types)


def initialize_distributed(
    coordinator: str = "", num_processes: int = 0, process_id: int = -1, timeout_s: int = 300
) -> None:
    """Join the other hosts; does nothing on a single host.

    Explicit values (config or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) win; otherwise
    JAX auto-detects TPU pods and SLURM/Open MPI clusters. A Cloud TPU VM describes its slice in the metadata
    server, not the environment, so there `DIFFJAX_MULTIHOST=1` (set by tpu_setup/launch.sh) asks for that
    auto-detection. CPU processes use gloo collectives.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
    cluster = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
        or env.get("DIFFJAX_MULTIHOST") == "1"
    )
    if not coordinator and not cluster:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": timeout_s}
    if coordinator:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes or None)
        kwargs.update(process_id=process_id if process_id >= 0 else None)
    jax.distributed.initialize(**kwargs)


_barriers = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here (no-op on one). A coordination-service barrier, not a device
    collective: a process that arrives minutes late (building a dataset, say) is fine."""
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=f"diffjax:{name}:{next(_barriers)}", timeout_ms=timeout_s * 1000)
