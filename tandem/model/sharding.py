"""The one logical-axis -> mesh-axis table, and the helpers that apply it.

Params and activations are annotated with logical names (`embed`, `heads`, ...); only
this module knows how those map onto the physical mesh axes `data`, `fsdp`, `tensor`.
Training (FSDP + tensor parallel) and serving (tensor parallel) use the same table: on
a serving mesh the `data`/`fsdp` axes simply have size 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem.kernels import MeshAxes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by model params and activations.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
VOCAB = "vocab"
LAYERS = "layers"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
)
_RULES = dict(LOGICAL_RULES)


def _mesh_axes(name: str) -> tuple[str, ...]:
    target = _RULES[name]
    return (target,) if isinstance(target, str) else tuple(target or ())


# How attention kernels split over the mesh (tandem/kernels/sharding.py: `per_shard`): batch rows
# as activations are split, query and kv heads as their weights are. A query head must
# share a device with its kv head, so the two rules must agree.
assert _RULES[HEADS] == _RULES[KV_HEADS]
ATTENTION_AXES = MeshAxes(batch=_mesh_axes(BATCH), heads=_mesh_axes(HEADS))


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec. With `shape` and `mesh`, a dimension the
    mesh axes do not divide is replicated instead (logged once), never an error at jit."""
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        target = _RULES.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if axes and shape is not None and mesh is not None:
            size = 1
            for a in axes:
                size *= mesh.shape[a]
            if shape[dim] % size:
                _warn_once(name, shape[dim], axes, size)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


_warned: set[tuple] = set()


def _warn_once(name: str | None, dim: int, axes: tuple[str, ...], size: int) -> None:
    key = (name, dim, axes)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "logical axis %r of size %d is not divisible by mesh axes %s (size %d); replicating it",
            name,
            dim,
            axes,
            size,
        )


def param_partition_specs(params: nnx.State, mesh: Mesh | None = None) -> nnx.State:
    """A tree like `params` holding each param's PartitionSpec (from its logical names)."""

    def spec(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
        return variable.replace(logical_to_spec(axes, variable.get_value().shape, mesh))

    return jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
    """A tree like `params` holding each param's NamedSharding on `mesh`."""
    specs = param_partition_specs(params, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], *, last_dims_first: bool = False
) -> jax.Array:
    """Sharding constraint on an activation at a block boundary; a no-op with no mesh set.

    A mesh axis goes to the first dimension that asks for it; with `last_dims_first` the
    dimensions ask from the last one back (e.g. an embedding lookup, whose last dimension
    keeps the table's sharding and whose batch gets only the mesh axes left over)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    if last_dims_first:
        spec = logical_to_spec(logical_axes[::-1], x.shape[::-1], mesh)
        spec = PartitionSpec(*reversed(spec))
    else:
        spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
