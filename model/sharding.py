"""The one logical-axis -> mesh-axis table, and the helpers that apply it.

Params and activations are annotated with logical names (`embed`, `heads`, ...); only
this module knows how those map onto the physical mesh axes `data`, `fsdp`, `tensor`.
Training (FSDP + tensor parallel) and serving (tensor parallel) use the same table: on
a serving mesh the `data`/`fsdp` axes simply have size 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def per_shard(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    logical_axes: Sequence[Sequence[str | None]],
    heads: tuple[int, int],
) -> jax.Array:
    """`fn(*args)` run on each device's shard of `args` (`jax.shard_map`) when a mesh with
    several devices is set, else called directly. The output has the first argument's
    shape and axes.

    For attention: a Pallas call is opaque to XLA's partitioner, which would gather sharded
    operands onto every device and compute the whole batch everywhere. Attention is
    independent per batch row and per kv-head group, so each device computes its own.
    `heads` = (the axis of the query-head dimension in args[0], the kv-head axis in args[1]):
    a query head must sit on the device that holds its kv head, so when the mesh shards
    one of the two but not the other (a count it does not divide), both stay whole.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(*args)
    specs = [
        list(logical_to_spec(ax, a.shape, mesh)) for a, ax in zip(args, logical_axes, strict=True)
    ]
    q_head, kv_head = heads
    if specs[0][q_head] != specs[1][kv_head]:
        specs[0][q_head] = None
        for spec, ax in zip(specs[1:], logical_axes[1:], strict=True):
            for dim, name in enumerate(ax):
                if name == KV_HEADS:
                    spec[dim] = None
    in_specs = tuple(PartitionSpec(*spec) for spec in specs)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=in_specs[0], check_vma=False)(*args)
