"""Picks an attention implementation per backend; the model calls only these two functions.

`impl` values (also `ModelConfig.attention_impl`):
  auto              compiled Pallas on GPU when the shape is supported, else the reference
                    (always the reference on CPU and TPU)
  reference         the pure-JAX reference (XLA)
  pallas            compiled Pallas kernel (GPU; ValueError on CPU and TPU)
  pallas_interpret  the Pallas kernel in interpret mode (CPU; for tests)

A shape the kernel cannot take (head_dim not a power of two >= 16, a length no tile size
divides, ...) falls back to the reference with one logged warning per (kernel, reason):
a slower answer, never a wrong one. `pallas_interpret` applies the same shape rules as
compiled `pallas`, so CPU tests exercise exactly what a GPU would compile.

The decision is taken in Python on static shapes, i.e. once per trace under `jax.jit`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from kernels._common import pick_block
from kernels.decode_attention import DEFAULT_BLOCK_K as _DECODE_BLOCK_K
from kernels.decode_attention import ragged_decode_attention
from kernels.decode_attention import unsupported_reason as _decode_unsupported
from kernels.prefill_attention import DEFAULT_BLOCK_K as _PREFILL_BLOCK_K
from kernels.prefill_attention import DEFAULT_BLOCK_Q as _PREFILL_BLOCK_Q
from kernels.prefill_attention import flash_attention
from kernels.prefill_attention import unsupported_reason as _prefill_unsupported
from kernels.reference import attention_reference, decode_attention_reference

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")

_warned: set[tuple[str, str]] = set()


def _check_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: allowed values are {ATTENTION_IMPLS}")


def _kernel_mode(impl: str) -> str | None:
    """'compiled', 'interpret', or None (use the reference) for this impl on this backend."""
    backend = jax.default_backend()
    if impl == "reference":
        return None
    if impl == "pallas_interpret":
        return "interpret"
    if impl == "pallas":
        if backend != "gpu":
            raise ValueError(
                f"attention_impl='pallas' compiles the Triton kernels, which need a GPU; the "
                f"backend is {backend!r}. Use attention_impl='pallas_interpret' (slow, for "
                f"tests) or 'reference' (or 'auto', which picks per backend)."
            )
        return "compiled"
    return "compiled" if backend == "gpu" else None  # auto


def _warn_fallback(kernel: str, reason: str) -> None:
    if (kernel, reason) not in _warned:
        _warned.add((kernel, reason))
        logger.warning("%s: falling back to the XLA reference: %s", kernel, reason)


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
    mode = _kernel_mode(impl)
    if mode is None:
        return attention_reference(q, k, v, segment_ids=segment_ids)
    seq = q.shape[1] if q.ndim == 4 else 0
    block_q = pick_block(seq, _PREFILL_BLOCK_Q)
    block_k = pick_block(seq, _PREFILL_BLOCK_K)
    if block_q is None or block_k is None:
        reason = f"seq_len T={seq} is not a multiple of 16"
    else:
        reason = _prefill_unsupported(
            q.shape, k.shape, (q.dtype, k.dtype, v.dtype), block_q, block_k
        )
    if reason is not None:
        _warn_fallback("flash_attention", reason)
        return attention_reference(q, k, v, segment_ids=segment_ids)
    return flash_attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        block_q=block_q,
        block_k=block_k,
        interpret=mode == "interpret",
    )


def decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, K, S, H], or [L, B, K, S, H] with `layer`
    v_cache: jax.Array,  # [B, K, S, H], or [L, B, K, S, H] with `layer`
    lengths: jax.Array,  # [B] int32
    *,
    impl: str = "auto",
    layer: jax.Array | int | None = None,  # [] int32
) -> jax.Array:  # [B, N, H]
    """One query token per slot against that slot's first `lengths[b]` cache entries.

    `layer` (optional, an addition to the original contract): pass the whole-model cache
    and the layer index instead of `cache[layer]`, so the kernel reads the layer in place
    rather than after XLA has copied it out.
    """
    _check_impl(impl)
    if layer is not None and k_cache.ndim != 5:
        raise ValueError(f"layer= needs the [L, B, K, S, H] cache; k_cache has {k_cache.shape}")

    def reference() -> jax.Array:
        return _length_bucketed_reference(q, k_cache, v_cache, lengths, layer)

    mode = _kernel_mode(impl)
    if mode is None:
        return reference()
    slot_shape = k_cache.shape[-4:]  # [B, K, S, H]
    max_len = slot_shape[2] if len(slot_shape) == 4 else 0
    block_k = pick_block(max_len, _DECODE_BLOCK_K)
    if block_k is None:
        reason = f"max_len S={max_len} is not a multiple of 16"
    else:
        reason = _decode_unsupported(
            q.shape, slot_shape, (q.dtype, k_cache.dtype, v_cache.dtype), block_k
        )
    if reason is not None:
        _warn_fallback("ragged_decode_attention", reason)
        return reference()
    return ragged_decode_attention(
        q,
        k_cache,
        v_cache,
        lengths,
        layer=layer,
        block_k=block_k,
        interpret=mode == "interpret",
    )


# The reference reads every cache position up to S, while slots are usually far shorter.
# It therefore runs over the shortest power-of-two prefix of the cache (>= this) that holds
# every slot's length, chosen on device with `lax.switch`: work follows the longest live
# slot rather than the cache capacity, and no shape depends on the data.
MIN_REFERENCE_DECODE_LEN = 128


def reference_length_buckets(max_len: int) -> tuple[int, ...]:
    """Prefix lengths the reference decode attention may read: powers of two, then S."""
    sizes = []
    size = MIN_REFERENCE_DECODE_LEN
    while size < max_len:
        sizes.append(size)
        size *= 2
    return (*sizes, max_len)


def _length_bucketed_reference(q, k_cache, v_cache, lengths, layer) -> jax.Array:
    max_len = k_cache.shape[-2]
    sizes = reference_length_buckets(max_len)

    def prefix(size: int):
        def attend(q, k_cache, v_cache, lengths, layer):
            if layer is not None:  # [L, B, K, S, H] -> [B, K, S, H], read in place
                k_cache = jax.lax.dynamic_index_in_dim(k_cache, layer, keepdims=False)
                v_cache = jax.lax.dynamic_index_in_dim(v_cache, layer, keepdims=False)
            return decode_attention_reference(
                q, k_cache[:, :, :size], v_cache[:, :, :size], lengths
            )

        return attend

    if len(sizes) == 1:
        return prefix(max_len)(q, k_cache, v_cache, lengths, layer)
    need = jnp.max(lengths)  # every slot's valid entries must fit in the prefix
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need)  # first size >= need
    index = jnp.minimum(index, len(sizes) - 1)
    return jax.lax.switch(index, [prefix(s) for s in sizes], q, k_cache, v_cache, lengths, layer)
