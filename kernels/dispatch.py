"""Picks an attention implementation per backend; the model calls only these two functions.

`impl` values (also `ModelConfig.attention_impl`):
  auto              compiled Pallas on GPU/TPU when the shape is supported, else reference
  reference         the pure-JAX reference (XLA)
  pallas            compiled Pallas kernel (GPU/TPU only)
  pallas_interpret  Pallas kernel in interpret mode (CPU; for tests)

Only the reference is wired in so far; the Pallas kernels land with the kernels issue.
"""

from __future__ import annotations

import jax

from kernels.reference import attention_reference, decode_attention_reference

ATTENTION_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")


def _check_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: allowed values are {ATTENTION_IMPLS}")


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    segment_ids: jax.Array | None = None,  # [B, T]
    impl: str = "auto",
) -> jax.Array:  # [B, T, N, H]
    """Causal (segment-masked) grouped-query attention over a whole sequence."""
    _check_impl(impl)
    return attention_reference(q, k, v, segment_ids=segment_ids)


def decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, K, S, H]
    v_cache: jax.Array,  # [B, K, S, H]
    lengths: jax.Array,  # [B] int32
    *,
    impl: str = "auto",
) -> jax.Array:  # [B, N, H]
    """One query token per slot against that slot's first `lengths[b]` cache entries."""
    _check_impl(impl)
    return decode_attention_reference(q, k_cache, v_cache, lengths)
