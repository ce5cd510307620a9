"""Ahead-of-time compilation of the sharded train step for a TPU slice, without the TPU.

libtpu's topology descriptions give device objects for any slice (`v5p:4x4x4`, ...), and the real TPU
compiler (XLA + Mosaic) runs on this host, so per-device memory and FLOPs are the ones the slice would see.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from diffjax.config import ConfigError, model_config, validate
from diffjax.parallel.mesh import make_mesh
from diffjax.train.flops import hbm_gib, training_flops_per_token
from diffjax.train.state import make_trainer

BATCH_DTYPES = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices of topology `name` (multi-slice jobs: `mesh.dcn_shape`)."""
    try:
        from jax.experimental import topologies

        slices = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **slices).devices)
    except (ImportError, RuntimeError, ValueError) as error:
        raise ConfigError(
            f"aot_topology={name!r}: no TPU topology ({str(error).splitlines()[0] if str(error) else error!r}); "
            'install libtpu with `pip install -e ".[tpu]"` and use a name such as v5e:2x2 or v5p:4x4x4'
        ) from None


def compile_for_topology(config: ml_collections.ConfigDict) -> dict[str, float | str]:
    """Compile the full train step for `config.aot_topology`; per-device memory and FLOPs of one step.

    FLOPs are the analytic model count: XLA's cost analysis counts a scanned layer stack's body once.
    """
    validate(config)
    devices = topology_devices(config.aot_topology, math.prod(config.mesh.dcn_shape))
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
    trainer = make_trainer(config, mesh)
    shape = (config.batch_size, config.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding) for k, dtype in BATCH_DTYPES.items()
    }
    lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    report = {
        "topology": config.aot_topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "mesh": str(dict(mesh.shape)),
        "hbm_bytes_per_device": hbm_gib(devices[0].device_kind) * 2.0**30,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {**report, "error": str(error).splitlines()[0]}
    memory = compiled.memory_analysis()
    used = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    used -= memory.alias_size_in_bytes  # donated state: arguments and outputs share buffers
    model_flops = training_flops_per_token(model_config(config), config.seq_len) * config.batch_size * config.seq_len
    return {
        **report,
        "bytes_per_device": float(used),
        "model_flops_per_device": model_flops / len(devices),
    }


def describe(report: dict[str, float | str]) -> str:
    gib = 2.0**30
    where = f"{report['topology']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}"
    if "error" in report:
        return f"{where}: DOES NOT FIT in {report['hbm_bytes_per_device'] / gib:.0f} GiB HBM: {report['error']}"
    fits = "fits" if report["bytes_per_device"] <= report["hbm_bytes_per_device"] else "DOES NOT FIT"
    return (
        f"{where}: {report['bytes_per_device'] / gib:.2f} GiB per device "
        f"of {report['hbm_bytes_per_device'] / gib:.0f} GiB HBM "
        f"({fits}); {report['model_flops_per_device']:.3g} model FLOP per device per step"
    )
