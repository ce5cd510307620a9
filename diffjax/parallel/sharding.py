"""Logical axis names -> mesh axes.

The model names the axes of its parameters (`vocab, embed, heads, kv_heads, mlp, norm, head_dim, layers`)
and of its main activations (`act_*`) and knows nothing else; one rules table (`config.sharding_rules`)
maps those names onto the mesh axes `data, fsdp, tensor`, and this module applies it.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def as_rules(table: Sequence[Sequence]) -> Rules:
    """A rules table from a config or its JSON (where tuples came back as lists) as hashable tuples."""
    return tuple((name, tuple(target) if isinstance(target, list) else target) for name, target in table)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("sharding", default=None)


def logical_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry the logical names `axes`."""
    table = {name: target for name, target in rules}
    unknown = [axis for axis in axes if axis is not None and axis not in table]
    if unknown:
        raise ValueError(f"no sharding rule for logical axes {unknown}; add them to config.sharding_rules")
    return PartitionSpec(*(table[axis] if axis is not None else None for axis in axes))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """How many ways a dimension mapped to mesh `axes` (one spec entry) is split."""
    names = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[name] for name in names)


def active_sharding() -> tuple[Mesh, Rules] | None:
    """The mesh and rules of the enclosing `activation_sharding`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation by logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, rules)))


def tree_shardings(tree, mesh: Mesh, rules: Rules):
    """NamedShardings mirroring `tree`: parameters and optimizer moments by logical axes, the rest replicated."""

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("out_sharding")
            return leaf.replace(NamedSharding(mesh, logical_spec(axes, rules) if axes else PartitionSpec()))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs that carry their target shardings: what Orbax restores and AOT compiles read."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
