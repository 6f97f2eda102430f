"""Attention kernels: Pallas implementations beside the pure-JAX references they must match."""

from tandem.kernels.dispatch import AttentionImpl, attention, decode_attention, runs_pallas

__all__ = ["AttentionImpl", "attention", "decode_attention", "runs_pallas"]
