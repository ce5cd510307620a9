"""Choose the attention core: `model.attention_impl` in `auto`, `reference`, `blockwise`, `pallas`.

An explicit choice is obeyed or refused with the reason (`AttentionImplError`, a one-line usage error),
never swapped for another implementation behind the caller's back. `auto` picks, at trace time, the
fastest implementation that exists and supports the platform, dtype and sequence length:

- `pallas` (fused kernels, issue 7) does not exist yet, so `auto` chooses between the two XLA cores.
- CPU, measured on full training steps (docs/benchmarks.md, "Choosing the attention core"): blockwise with
  128 x 128 tiles beats the dense reference at every length tried, T = 128 (8% faster), 256 (7%), 512
  (28%) and 2048 (2.5x): it skips the tiles above the causal diagonal and never writes T x T
  probabilities to memory. So `auto` is blockwise on CPU at every T.
- GPU/TPU: not measured yet. The dense reference below `DENSE_BELOW` (large fused matmuls suit
  accelerators, and its T x T memory is still small), blockwise from there on (linear memory).

The platform is the default backend at trace time; an AOT compilation for another platform (TPU topologies
compiled on a CPU host) gets the CPU rule, which is exact there too, only perhaps not the fastest.
"""

import dataclasses

import jax
import jax.numpy as jnp

from diffjax.cli import UsageError
from diffjax.ops import blockwise, reference

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas")
DENSE_BELOW = 2048  # accelerators: `auto` runs the dense reference below this sequence length
_CORES = {"reference": reference, "blockwise": blockwise}


class AttentionImplError(UsageError):
    """An attention implementation that cannot run the requested computation, and why."""


def unavailable_reason(impl: str) -> str | None:
    """Why `impl` can never be used in this build (unknown, or not implemented yet), or None."""
    if impl not in IMPLEMENTATIONS:
        return f"attention_impl={impl!r} is unknown; choose one of {list(IMPLEMENTATIONS)}"
    if impl == "pallas":
        return (
            "attention_impl='pallas' is not implemented yet (fused Pallas kernels come with issue 7); "
            f"available: {['auto', *_CORES]}"
        )
    return None


def resolve(impl: str, length: int, dtype: jnp.dtype, platform: str) -> str:
    """The implementation that runs sequence length `length` in `dtype` on `platform` (`cpu`, `gpu`, `tpu`):
    `impl` itself unless it is `auto`."""
    reason = unavailable_reason(impl)
    if reason:
        raise AttentionImplError(reason)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise AttentionImplError(f"attention_impl={impl!r} needs floating-point inputs, got {jnp.dtype(dtype)}")
    if impl != "auto":
        return impl
    return "reference" if platform != "cpu" and length < DENSE_BELOW else "blockwise"


@dataclasses.dataclass(frozen=True)
class AttentionCore:
    """The attention cores a layer calls, bound to one `attention_impl` and blockwise tile sizes.

    Frozen and hashable, so a module can hold it as static structure.
    """

    impl: str
    block_q: int
    block_k: int

    def _options(self, q: jax.Array) -> tuple[object, dict[str, int]]:
        name = resolve(self.impl, q.shape[1], q.dtype, jax.default_backend())
        options = {"block_q": self.block_q, "block_k": self.block_k} if name == "blockwise" else {}
        return _CORES[name], options

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
        core, options = self._options(q1)
        return core.diff_attention(q1, q2, k1, k2, v, lam, segment_ids, **options)

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """`reference.attention`'s contract, computed by the chosen core."""
        core, options = self._options(q)
        return core.attention(q, k, v, segment_ids, **options)
