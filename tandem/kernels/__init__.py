"""Attention kernels: Pallas implementations beside the pure-JAX references they must match."""

from tandem.kernels.dispatch import (
    AttentionImpl,
    attention,
    decode_attention,
    paged_attention,
    runs_pallas,
)
from tandem.kernels.paged_reference import write_pages
from tandem.kernels.sharding import MeshAxes

__all__ = [
    "AttentionImpl",
    "MeshAxes",
    "attention",
    "decode_attention",
    "paged_attention",
    "runs_pallas",
    "write_pages",
]
