"""Attention kernels: Pallas implementations beside the pure-JAX references they must match."""

from tandem.kernels.dispatch import AttentionImpl, attention, paged_attention
from tandem.kernels.paged_reference import write_pages
from tandem.kernels.sharding import MeshAxes

__all__ = [
    "AttentionImpl",
    "MeshAxes",
    "attention",
    "paged_attention",
    "write_pages",
]
