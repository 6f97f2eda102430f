"""Attention kernels: Pallas implementations beside the pure-JAX references they must match."""

from kernels.dispatch import ATTENTION_IMPLS, attention, decode_attention, runs_pallas

__all__ = ["ATTENTION_IMPLS", "attention", "decode_attention", "runs_pallas"]
