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
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from tandem.config import require
from tandem.kernels._common import pick_block
from tandem.kernels.decode_attention import DEFAULT_BLOCK_K as _DECODE_BLOCK_K
from tandem.kernels.decode_attention import ragged_decode_attention
from tandem.kernels.decode_attention import unsupported_reason as _decode_unsupported
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_K as _PREFILL_BLOCK_K
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_Q as _PREFILL_BLOCK_Q
from tandem.kernels.prefill_attention import flash_attention
from tandem.kernels.prefill_attention import unsupported_reason as _prefill_unsupported
from tandem.kernels.reference import attention_reference, decode_attention_reference

logger = logging.getLogger(__name__)

AttentionImpl = Literal["auto", "reference", "pallas", "pallas_interpret"]

_warned: set[tuple[str, str]] = set()


def _check_impl(impl: str) -> None:
    require(impl in get_args(AttentionImpl), "attention_impl", impl, str(get_args(AttentionImpl)))


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


def runs_pallas(impl: str) -> bool:
    """Whether `impl` runs a Pallas kernel on this backend (compiled or interpreted). Such a
    call is opaque to XLA's SPMD partitioner, so callers on a device mesh must map it over
    their shards themselves (model/sharding.py: `per_shard`)."""
    _check_impl(impl)
    return _kernel_mode(impl) is not None


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
    k_cache: jax.Array,  # [B, K, S, H]
    v_cache: jax.Array,  # [B, K, S, H]
    lengths: jax.Array,  # [B] int32
    *,
    slots: jax.Array | None = None,  # [B] int32 cache row per query; None = row b
    impl: str = "auto",
) -> jax.Array:  # [B, N, H]
    """One query token per slot against the first `lengths[b]` entries of its cache row
    (`slots[b]`, as in `decode_attention_reference`)."""
    _check_impl(impl)
    mode = _kernel_mode(impl)
    in_place = mode is None and jax.default_backend() == "cpu"  # the CPU loop reads the rows
    if slots is not None and not in_place:  # every other path reads row b for query b
        k_cache, v_cache, slots = k_cache[slots], v_cache[slots], None
    if mode is None:
        return _length_bucketed_reference(q, k_cache, v_cache, lengths, slots)
    max_len = k_cache.shape[2] if k_cache.ndim == 4 else 0
    block_k = pick_block(max_len, _DECODE_BLOCK_K)
    if block_k is None:
        reason = f"max_len S={max_len} is not a multiple of 16"
    else:
        reason = _decode_unsupported(
            q.shape, k_cache.shape, (q.dtype, k_cache.dtype, v_cache.dtype), block_k
        )
    if reason is not None:
        _warn_fallback("ragged_decode_attention", reason)
        return _length_bucketed_reference(q, k_cache, v_cache, lengths, slots)
    return ragged_decode_attention(
        q,
        k_cache,
        v_cache,
        lengths,
        block_k=block_k,
        interpret=mode == "interpret",
    )


# The reference reads every cache position up to S, while slots are usually far shorter
# and of very different lengths. Where it runs (CPU, TPU, unsupported GPU shapes) it is
# therefore applied to cache prefixes chosen on device with `lax.switch` over fixed sizes,
# so work follows the live lengths rather than the capacity and no shape depends on data:
#   * CPU: a loop over groups of up to 4 slots, each group reading the prefix of its
#     longest slot (multiples of 64, then four sizes per octave). An iteration has a
#     fixed cost there whatever it reads, so one slot per iteration paid it four times as
#     often; a whole-batch prefix makes every short slot read the longest one's length
#     (measured: docs/benchmarks.md, "Measurements behind code choices");
#   * accelerators, where a loop of small ops is slow: one prefix for the whole batch,
#     the shortest power of two (>= 128) that holds the longest slot.
MIN_REFERENCE_DECODE_LEN = 128
_PER_SLOT_MIN_LEN = 64


def reference_length_buckets(max_len: int) -> tuple[int, ...]:
    """Whole-batch prefix lengths: powers of two from MIN_REFERENCE_DECODE_LEN, then S."""
    sizes = []
    size = MIN_REFERENCE_DECODE_LEN
    while size < max_len:
        sizes.append(size)
        size *= 2
    return (*sizes, max_len)


def per_slot_length_buckets(max_len: int) -> tuple[int, ...]:
    """Per-slot prefix lengths: multiples of 64 up to 512, then four per octave, then S
    (at most 25 % more than a slot needs past 512; 24 branches for S = 8192)."""
    sizes = []
    size, step = _PER_SLOT_MIN_LEN, _PER_SLOT_MIN_LEN
    while size < max_len:
        sizes.append(size)
        if size >= 8 * step:
            step *= 2
        size += step
    return (*sizes, max_len)


def slot_group_size(batch: int) -> int:
    """Slots per iteration of the CPU decode loop: 4, or the largest of 2, 1 that divides
    the batch."""
    return next(g for g in (4, 2, 1) if batch % g == 0)


def _bucket_index(sizes: tuple[int, ...], need: jax.Array) -> jax.Array:
    """Index of the first size >= need (the last one if none is)."""
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need)
    return jnp.minimum(index, len(sizes) - 1)


def _length_bucketed_reference(q, k_cache, v_cache, lengths, slots) -> jax.Array:
    if jax.default_backend() == "cpu":
        return _slot_group_reference(q, k_cache, v_cache, lengths, slots)
    return _batch_prefix_reference(q, k_cache, v_cache, lengths)  # slots gathered already


def _batch_prefix_reference(q, k_cache, v_cache, lengths) -> jax.Array:
    sizes = reference_length_buckets(k_cache.shape[2])

    def prefix(size: int):
        def attend(q, k_cache, v_cache, lengths):
            return decode_attention_reference(
                q, k_cache[:, :, :size], v_cache[:, :, :size], lengths
            )

        return attend

    if len(sizes) == 1:
        return prefix(sizes[0])(q, k_cache, v_cache, lengths)
    index = _bucket_index(sizes, jnp.max(lengths))  # every slot must fit in the prefix
    return jax.lax.switch(index, [prefix(s) for s in sizes], q, k_cache, v_cache, lengths)


def _slot_group_reference(q, k_cache, v_cache, lengths, slots) -> jax.Array:
    batch = q.shape[0]
    _, n_kv, _, head_dim = k_cache.shape
    group = slot_group_size(batch)
    sizes = per_slot_length_buckets(k_cache.shape[2])
    rows = jnp.arange(batch, dtype=jnp.int32) if slots is None else slots

    def prefix(size: int):
        def read(cache, first):  # [group, K, size, H]: each query's own cache row
            return jnp.concatenate(
                [
                    jax.lax.dynamic_slice(
                        cache, (rows[first + j], 0, 0, 0), (1, n_kv, size, head_dim)
                    )
                    for j in range(group)
                ]
            )

        def attend(first):
            query = jax.lax.dynamic_slice_in_dim(q, first, group)
            length = jax.lax.dynamic_slice_in_dim(lengths, first, group)
            k, v = read(k_cache, first), read(v_cache, first)
            return decode_attention_reference(query, k, v, length)  # [group, N, H]

        return attend

    branches = [prefix(s) for s in sizes]
    longest = jnp.max(lengths.reshape(batch // group, group), axis=1)  # [B / group]
    indices = _bucket_index(sizes, longest)  # once: not a search per loop iteration

    def one_group(i, out):
        first = i * group
        return jax.lax.dynamic_update_slice_in_dim(
            out, jax.lax.switch(indices[i], branches, first), first, 0
        )

    return jax.lax.fori_loop(0, batch // group, one_group, jnp.zeros_like(q))
