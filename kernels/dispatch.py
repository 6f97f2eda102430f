"""Picks an attention implementation per backend; the model calls only these functions
(`attention`, `decode_attention`, `paged_attention`) and nothing else of this package's.

`impl` values (also `ModelConfig.attention_impl`):
  auto              compiled Pallas on GPU when the shape is supported, else the reference
                    (always the reference on CPU and TPU)
  reference         the XLA reference (bucketed_reference.py where one exists)
  pallas            compiled Pallas kernel (GPU; ValueError on CPU and TPU)
  pallas_interpret  the Pallas kernel in interpret mode (CPU; for tests)

A shape the kernel cannot take (head_dim not a power of two >= 16, a length no tile size
divides, ...) falls back to the reference with one logged warning per (kernel, reason):
a slower answer, never a wrong one. `pallas_interpret` applies the same shape rules as
compiled `pallas`, so CPU tests exercise exactly what a GPU would compile.

With `mesh_axes` (the model passes its rule table's, model/sharding.py) a kernel runs per
mesh shard (sharding.py: `per_shard`); the reference is left to XLA's partitioner.

The decision is taken in Python on static shapes, i.e. once per trace under `jax.jit`.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal, get_args

import jax

from tandem.config import require
from tandem.kernels._common import pick_block
from tandem.kernels.bucketed_reference import (
    decode_attention_bucketed,
    ragged_paged_attention_blocked,
)
from tandem.kernels.decode_attention import DEFAULT_BLOCK_K as _DECODE_BLOCK_K
from tandem.kernels.decode_attention import ragged_decode_attention
from tandem.kernels.decode_attention import unsupported_reason as _decode_unsupported
from tandem.kernels.paged_attention import DEFAULT_BLOCK_K as _PAGED_BLOCK_K
from tandem.kernels.paged_attention import auto_block_q, ragged_paged_attention
from tandem.kernels.paged_attention import unsupported_reason as _paged_unsupported
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_K as _PREFILL_BLOCK_K
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_Q as _PREFILL_BLOCK_Q
from tandem.kernels.prefill_attention import flash_attention
from tandem.kernels.prefill_attention import unsupported_reason as _prefill_unsupported
from tandem.kernels.reference import attention_reference
from tandem.kernels.sharding import MeshAxes, per_shard

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
    """Whether `impl` runs a Pallas kernel on this backend (compiled or interpreted): the
    serving engine shapes its decode step differently for the kernel and the CPU loop."""
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
    mesh_axes: MeshAxes | None = None,
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
    kernel = functools.partial(
        flash_attention, block_q=block_q, block_k=block_k, interpret=mode == "interpret"
    )
    if segment_ids is None:
        return per_shard(kernel, (q, k, v), ("BTNH", "BTKH", "BTKH"), mesh_axes)

    def segmented(q, k, v, segment_ids):
        return kernel(q, k, v, segment_ids=segment_ids)

    return per_shard(segmented, (q, k, v, segment_ids), ("BTNH", "BTKH", "BTKH", "BT"), mesh_axes)


def decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [Bc, K, S, H]
    v_cache: jax.Array,  # [Bc, K, S, H]
    lengths: jax.Array,  # [B] int32
    *,
    slots: jax.Array | None = None,  # [B] int32 cache row per query; None = row b (Bc = B)
    impl: str = "auto",
    mesh_axes: MeshAxes | None = None,
) -> jax.Array:  # [B, N, H]
    """One query token per slot against the first `lengths[b]` entries of its cache row
    (`slots[b]`, as in `decode_attention_reference`)."""
    _check_impl(impl)
    mode = _kernel_mode(impl)
    if mode is None:
        return decode_attention_bucketed(q, k_cache, v_cache, lengths, slots)
    max_len = k_cache.shape[2] if k_cache.ndim == 4 else 0
    block_k = pick_block(max_len, _DECODE_BLOCK_K)
    if block_k is None:
        reason = f"max_len S={max_len} is not a multiple of 16"
    else:
        cache_shape = k_cache.shape if slots is None else (q.shape[0], *k_cache.shape[1:])
        reason = _decode_unsupported(
            q.shape, cache_shape, (q.dtype, k_cache.dtype, v_cache.dtype), block_k
        )
    if reason is not None:
        _warn_fallback("ragged_decode_attention", reason)
        return decode_attention_bucketed(q, k_cache, v_cache, lengths, slots)
    if slots is not None:  # the kernel reads row b for query b
        k_cache, v_cache = k_cache[slots], v_cache[slots]
    kernel = functools.partial(
        ragged_decode_attention, block_k=block_k, interpret=mode == "interpret"
    )
    return per_shard(
        kernel, (q, k_cache, v_cache, lengths), ("BNH", "BKSH", "BKSH", "B"), mesh_axes
    )


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,  # [K, P, Ps, H]
    kv_lens: jax.Array,  # [R] int32
    page_indices: jax.Array,  # [R, Pr] int32
    cu_q_lens: jax.Array,  # [R + 1] int32
    num_rows: jax.Array,  # [] int32
    *,
    sm_scale: float | None = None,
    impl: str = "auto",
    mesh_axes: MeshAxes | None = None,
) -> jax.Array:  # [T, N, H]
    """Attention of a ragged step (decode rows and prompt chunks) over a paged KV cache:
    the contract of `ragged_paged_attention_reference` (paged_reference.py). On a mesh
    the kernel runs per kv-head shard (a step's rows are ragged, so never split)."""
    _check_impl(impl)
    mode = _kernel_mode(impl)
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_rows)
    if mode is None:
        return ragged_paged_attention_blocked(*args, sm_scale=sm_scale)
    page_size = k_pages.shape[2] if k_pages.ndim == 4 else 1
    block_k = max(_PAGED_BLOCK_K, page_size)
    block_q = auto_block_q(q.shape[-2], k_pages.shape[0]) if q.ndim == 3 else 1
    reason = _paged_unsupported(
        q.shape, k_pages.shape, (q.dtype, k_pages.dtype, v_pages.dtype), block_q, block_k
    )
    if reason is not None:
        _warn_fallback("ragged_paged_attention", reason)
        return ragged_paged_attention_blocked(*args, sm_scale=sm_scale)
    kernel = functools.partial(
        ragged_paged_attention,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        interpret=mode == "interpret",
    )
    return per_shard(kernel, args, ("TNH", "KPSH", "KPSH", "R", "RP", "R", ""), mesh_axes)
