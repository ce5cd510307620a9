"""Choose the attention core: `model.attention_impl` in `auto`, `reference`, `blockwise`, `pallas`.

An explicit choice is obeyed or refused with the reason (`AttentionImplError`, a one-line usage error),
never swapped for another implementation behind the caller's back. `auto` picks, at trace time:

- TPU and GPU: `pallas`, the fused kernels (`diffjax.ops.pallas`): one pass over K/V for both softmaxes,
  linear memory, masked tiles skipped. On a GPU whose jax has lost the Pallas Triton backend (deprecated
  from jax 0.11), `blockwise`.
- CPU: `blockwise`. Measured on full training steps (docs/benchmarks.md, "Choosing the attention core"),
  128 x 128 tiles beat the dense reference at every length tried, T = 128 (8% faster), 256 (7%), 512
  (28%) and 2048 (2.5x). Pallas kernels only run interpreted on CPU (correct, slow: for tests).

The platform is that of the devices of the mesh being traced for (`activation_sharding`), so an AOT
compilation for a TPU topology on a CPU host gets the TPU kernels; outside a mesh, the default backend.

Inside a mesh the Pallas call runs under `jax.shard_map` (Mosaic and Triton kernels are not partitioned
automatically): batch split as the `act_batch` rule says, heads as `act_heads`, each device attending
its own heads of its own sequences. That needs unsharded `act_length` and batch and head counts that
divide over their mesh axes; where they do not, `auto` takes `blockwise` (which GSPMD partitions) and an
explicit `pallas` is refused with the reason.

Decoding with a KV cache uses `CachedCore` instead, whatever `attention_impl` says: the new tokens attend a
whole cache, which the training cores (queries and keys of one length) do not cover.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from diffjax.cli import UsageError
from diffjax.ops import blockwise, pallas, reference
from diffjax.parallel.sharding import active_sharding, axis_size, logical_spec

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas")
BLOCKWISE_BLOCK = 128  # blockwise tiles when the config leaves them at 0 (fastest measured on CPU)
_XLA_CORES = {"reference": reference, "blockwise": blockwise}


class AttentionImplError(UsageError):
    """An attention implementation that cannot run the requested computation, and why."""


def unavailable_reason(impl: str) -> str | None:
    """Why `impl` can never be used in this build, or None."""
    if impl not in IMPLEMENTATIONS:
        return f"attention_impl={impl!r} is unknown; choose one of {list(IMPLEMENTATIONS)}"
    return None


def resolve(impl: str, dtype: jnp.dtype, platform: str) -> str:
    """The implementation that runs `dtype` inputs on `platform` (`cpu`, `gpu`, `tpu`): `impl` unless `auto`."""
    reason = unavailable_reason(impl)
    if reason:
        raise AttentionImplError(reason)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise AttentionImplError(f"attention_impl={impl!r} needs floating-point inputs, got {jnp.dtype(dtype)}")
    if impl != "auto":
        return impl
    return "pallas" if platform in pallas.KERNELS else "blockwise"


def target_platform() -> str:
    """The platform being compiled for: the active mesh's devices, else the default backend."""
    active = active_sharding()
    return active[0].devices.flat[0].platform if active else jax.default_backend()


@dataclasses.dataclass(frozen=True)
class AttentionCore:
    """The attention cores a layer calls, bound to one `attention_impl` and tile sizes (0: the core's default).

    Frozen and hashable, so a module can hold it as static structure.
    """

    impl: str
    block_q: int = 0
    block_k: int = 0

    def diff_attention(
        self,
        q1: jax.Array,
        q2: jax.Array,
        k1: jax.Array,
        k2: jax.Array,
        v: jax.Array,
        lam: jax.Array,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """`reference.diff_attention`'s contract, computed by the chosen core."""
        return self._call("diff_attention", (q1, q2, k1, k2, v), (lam,), segment_ids)

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """`reference.attention`'s contract, computed by the chosen core."""
        return self._call("attention", (q, k, v), (), segment_ids)

    def _call(
        self, name: str, heads: tuple[jax.Array, ...], scalars: tuple[jax.Array, ...], segment_ids: jax.Array | None
    ) -> jax.Array:
        """Run core function `name` on `[B, T, H, d]` arrays `heads`, replicated `scalars` and segment ids."""
        platform = target_platform()
        impl = resolve(self.impl, heads[0].dtype, platform)
        if impl == "pallas" and (problem := _unshardable(heads)):
            if self.impl != "auto":
                raise AttentionImplError(f"attention_impl='pallas' {problem}")
            impl = "blockwise"  # auto: the fastest core that can run this mesh and shape
        if impl != "pallas":
            tiles = {"block_q": self.block_q or BLOCKWISE_BLOCK, "block_k": self.block_k or BLOCKWISE_BLOCK}
            core = getattr(_XLA_CORES[impl], name)
            return core(*heads, *scalars, segment_ids, **(tiles if impl == "blockwise" else {}))
        q = heads[0]
        try:
            kernel = pallas.kernel_for(platform, q.shape[-1], q.dtype, self.block_q, self.block_k)
        except ValueError as error:
            raise AttentionImplError(f"attention_impl='pallas': {error}") from None
        fused = functools.partial(getattr(pallas, name), kernel=kernel)
        args = (*heads, *scalars) if segment_ids is None else (*heads, *scalars, segment_ids)
        return _per_shard(fused, len(heads), len(scalars), segment_ids is not None)(*args)


@dataclasses.dataclass(frozen=True)
class CachedCore(AttentionCore):
    """`AttentionCore`'s contract for queries at cache slots `start + [0, T)` over a whole KV cache `[B, S, ...]`
    whose slot is the token's position: slot `s` is visible to query `t` when `s <= start + t`.

    The dense reference math with that mask: a decoding step has one query row, nothing for tiles to skip.
    Slots past the query are masked, so whatever they hold (zeros, a padded prompt's tail) is never read.
    A decoded row is one document, so there are no `segment_ids`.
    """

    impl: str = "reference"
    start: jax.Array | int = dataclasses.field(default=0, kw_only=True)

    def _call(
        self, name: str, heads: tuple[jax.Array, ...], scalars: tuple[jax.Array, ...], segment_ids: None
    ) -> jax.Array:
        length, slots = heads[0].shape[1], heads[-1].shape[1]
        visible = jnp.arange(slots)[None, :] <= self.start + jnp.arange(length)[:, None]
        return getattr(reference, f"masked_{name}")(*heads, *scalars, visible[None, None, None])


def _unshardable(heads: tuple[jax.Array, ...]) -> str | None:
    """Why `[B, T, H, d]` inputs cannot be split by `shard_map` over the active mesh (None: they can, or
    there is no mesh): each device needs whole sequences, whole batch rows and whole heads."""
    active = active_sharding()
    if active is None:
        return None
    mesh, rules = active
    batch, length, head_axes = logical_spec(("act_batch", "act_length", "act_heads"), rules)
    if length is not None:
        return (
            f"needs whole sequences per device, but the rule for act_length shards them over {length!r}; "
            "map act_length to None in config.sharding_rules"
        )
    for size, axes, what in [
        (heads[0].shape[0], batch, "batch rows"),
        *((x.shape[2], head_axes, "heads") for x in heads),
    ]:
        ways = axis_size(mesh, axes)
        if size % ways:
            return (
                f"splits {what} {ways} ways over mesh axes {axes!r}, but an input has {size}; make them a multiple "
                f"of {ways} (batch_size, model.num_kv_heads) or change mesh.shape"
            )
    return None


def _per_shard(fn: Callable[..., jax.Array], num_heads: int, num_scalars: int, with_segments: bool) -> Callable:
    """`fn` under `jax.shard_map` over the active mesh (batch and heads split by the rules), or `fn` itself
    outside a mesh."""
    active = active_sharding()
    if active is None:
        return fn
    mesh, rules = active
    batch, head_axes = logical_spec(("act_batch", "act_heads"), rules)
    per_head = PartitionSpec(batch, None, head_axes, None)
    in_specs = (per_head,) * num_heads + (PartitionSpec(),) * num_scalars
    if with_segments:
        in_specs += (PartitionSpec(batch, None),)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=per_head, check_vma=False)
