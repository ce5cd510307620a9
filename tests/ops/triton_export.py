"""Lowering for CUDA without a GPU: `jax.export` of a function whose Pallas kernels go to Triton.

From jax 0.11 the Triton lowering no longer assumes a GPU when there is none ("No supported GPU devices
found, please specify an abstract GPU device"): the export runs under an abstract mesh whose device is an
H100 (compute capability 9.0, what 0.10 assumed). `CUSTOM_CALL_TARGET_NAME` is new in 0.11.
"""

import jax
from jax.experimental.pallas import triton as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

TRITON = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")


def cuda_mlir(fn, *args) -> str:
    """MLIR text of `jax.jit(fn)` exported for CUDA at `args` (shape structs), Triton calls allowed."""
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    with use_abstract_mesh(mesh):
        return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args).mlir_module()
