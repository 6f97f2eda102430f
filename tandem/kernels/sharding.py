"""Running a Pallas attention kernel on a device mesh: each device on its own shard.

A Pallas call is opaque to XLA's SPMD partitioner, which would all-gather its sharded
operands and compute the whole batch on every device. Attention is independent per batch
row and per kv-head group, so `per_shard` maps the kernel over the shards with
`jax.shard_map` instead. Which mesh axes split the batch and the heads is the model's
rule table's decision (tandem/model/sharding.py builds the `MeshAxes` it passes); this module
only applies it, so the dispatcher can wrap every kernel call in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec

logger = logging.getLogger(__name__)

_HEADS = "NK"  # query and kv head dimensions: split together or not at all
_warned: set[tuple] = set()


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """The mesh axes that split attention's batch (dimension letter B) and its query and
    kv heads (N, K). Axes missing from the mesh, or of size 1, are ignored."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()


def per_shard(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    dims: Sequence[str],
    axes: MeshAxes | None,
) -> jax.Array:
    """`fn(*args)`, run on each device's shard of `args` when a mesh with several devices
    is set and `axes` is given, else called directly. The output is laid out as args[0].

    `dims` names each argument's dimensions with the shape letters of WORKSPACE.md, one
    string per argument ("BTNH", "KPSH", "" for a scalar): B is split over `axes.batch`,
    N and K over `axes.heads`, every other letter stays whole. A query head must sit on
    the device that holds its kv head, so the heads are split only when the mesh divides
    every N and K; a batch the mesh does not divide stays whole too (logged once).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if axes is None or mesh is None or mesh.empty or mesh.size == 1:
        return fn(*args)
    if len(dims) != len(args) or any(len(d) != a.ndim for d, a in zip(dims, args, strict=True)):
        raise ValueError(f"dims {list(dims)} do not name the dimensions of {len(args)} args")

    def split(letters: str, names: tuple[str, ...]) -> str | tuple[str, ...] | None:
        names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
        sizes = {
            a.shape[i]
            for a, d in zip(args, dims, strict=True)
            for i, c in enumerate(d)
            if c in letters
        }
        if not names or not sizes:
            return None
        parts = math.prod(mesh.shape[n] for n in names)
        if any(size % parts for size in sizes):
            _warn_once(letters, tuple(sorted(sizes)), names, parts)
            return None
        return names[0] if len(names) == 1 else names

    batch = split("B", axes.batch)
    heads = split(_HEADS, axes.heads)
    specs = [
        PartitionSpec(*(batch if c == "B" else heads if c in _HEADS else None for c in d))
        for d in dims
    ]
    mapped = jax.shard_map(fn, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)
    return mapped(*args)


def _warn_once(letters: str, sizes: tuple[int, ...], names: tuple[str, ...], parts: int) -> None:
    key = (letters, sizes, names)
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "attention dimension %s of sizes %s is not divisible by mesh axes %s (%d parts); "
            "each device computes it whole",
            letters,
            sizes,
            names,
            parts,
        )
