"""Picks an attention implementation per backend; the model calls only these functions
(`attention` for training, `paged_attention` for serving) and nothing else of this
package's.

Two kernel families, picked by the backend: the Mosaic kernels on TPU (`tpu_attention.py`,
jax's splash attention; `tpu_paged_attention.py`, tandem's ragged paged kernel) and the
Triton kernels everywhere else (`prefill_attention.py`, `paged_attention.py`). On CPU,
serving's decode rows run in C++ (`cpu_decode_attention.py`), the rest in XLA.

`impl` values (also `ModelConfig.attention_impl`):
  auto              the backend's compiled kernels on GPU and TPU when the shape is
                    supported, else the reference; on CPU the reference with its decode
                    rows in tandem's C++ kernel (cpu_decode_attention.py) for a float32
                    cache, once a C++ compiler has built it
  reference         the XLA reference (bucketed_reference.py where one exists)
  pallas            the backend's compiled kernels (GPU, TPU; ValueError on CPU)
  pallas_interpret  the backend's family in interpret mode (the Triton kernels on CPU;
                    for tests)

A shape a kernel cannot take (head_dim not a power of two >= 16, a length no tile size
divides, ...) falls back to the reference with one logged warning per (kernel, reason): a
slower answer, never a wrong one. `pallas_interpret` applies the same shape rules as
compiled `pallas`, so CPU tests exercise exactly what an accelerator would compile.

With `mesh_axes` (the model passes its rule table's, tandem/model/sharding.py) a kernel runs per
mesh shard (sharding.py: `per_shard`); the reference is left to XLA's partitioner.

The decision is taken in Python on static shapes, i.e. once per trace under `jax.jit`.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from tandem.config import require
from tandem.kernels import cpu_decode_attention
from tandem.kernels._common import pick_block
from tandem.kernels.bucketed_reference import ragged_paged_attention_blocked
from tandem.kernels.paged_attention import DEFAULT_BLOCK_K as _PAGED_BLOCK_K
from tandem.kernels.paged_attention import auto_block_q, ragged_paged_attention
from tandem.kernels.paged_attention import unsupported_reason as _paged_unsupported
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_K as _PREFILL_BLOCK_K
from tandem.kernels.prefill_attention import DEFAULT_BLOCK_Q as _PREFILL_BLOCK_Q
from tandem.kernels.prefill_attention import flash_attention
from tandem.kernels.prefill_attention import unsupported_reason as _prefill_unsupported
from tandem.kernels.reference import attention_reference
from tandem.kernels.sharding import MeshAxes, per_shard
from tandem.kernels.tpu_attention import pick_block as _splash_block
from tandem.kernels.tpu_attention import splash_attention
from tandem.kernels.tpu_attention import unsupported_reason as _splash_unsupported
from tandem.kernels.tpu_paged_attention import DEFAULT_BLOCK_K as _TPU_PAGED_BLOCK_K
from tandem.kernels.tpu_paged_attention import auto_block_q as _tpu_auto_block_q
from tandem.kernels.tpu_paged_attention import ragged_paged_attention_tpu
from tandem.kernels.tpu_paged_attention import unsupported_reason as _tpu_paged_unsupported

logger = logging.getLogger(__name__)

AttentionImpl = Literal["auto", "reference", "pallas", "pallas_interpret"]

_warned: set[tuple[str, str]] = set()


def _check_impl(impl: str) -> None:
    require(impl in get_args(AttentionImpl), "attention_impl", impl, str(get_args(AttentionImpl)))


class KernelMode(NamedTuple):
    """Which kernels run, and how."""

    family: Literal["triton", "mosaic"]  # GPU kernels / TPU kernels
    interpret: bool


def _backend() -> str:
    """jax's default backend; a function so that tests can pose as a TPU or GPU."""
    return jax.default_backend()


def kernel_mode(impl: str) -> KernelMode | None:
    """The kernels `impl` runs on this backend, or None for the reference."""
    _check_impl(impl)
    backend = _backend()
    family = "mosaic" if backend == "tpu" else "triton"
    if impl == "reference":
        return None
    if impl == "pallas_interpret":
        return KernelMode(family, interpret=True)
    if impl == "pallas":
        if backend not in ("gpu", "tpu"):
            raise ValueError(
                f"attention_impl='pallas' compiles the Triton (GPU) or Mosaic (TPU) kernels; "
                f"the backend is {backend!r}. Use attention_impl='pallas_interpret' (slow, "
                f"for tests) or 'reference' (or 'auto', which picks per backend)."
            )
        return KernelMode(family, interpret=False)
    return KernelMode(family, interpret=False) if backend in ("gpu", "tpu") else None  # auto


def _native_decode(impl: str, cache_dtype: jax.typing.DTypeLike) -> bool:
    """Whether the CPU path runs its decode rows in the C++ kernel: under `auto` on CPU,
    for a float32 pool, once the kernel is built (cpu_decode_attention.py)."""
    return (
        impl == "auto"
        and _backend() == "cpu"
        and cache_dtype == jnp.float32
        and cpu_decode_attention.available()
    )


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
    mode = kernel_mode(impl)
    if mode is None:
        return attention_reference(q, k, v, segment_ids=segment_ids)
    dtypes = (q.dtype, k.dtype, v.dtype)
    seq = q.shape[1] if q.ndim == 4 else 0
    if mode.family == "mosaic":
        block = _splash_block(seq)
        name, reason = "splash_attention", _splash_unsupported(q.shape, k.shape, dtypes, block)
        kernel = functools.partial(splash_attention, block=block, interpret=mode.interpret)
    else:
        block_q = pick_block(seq, _PREFILL_BLOCK_Q)
        block_k = pick_block(seq, _PREFILL_BLOCK_K)
        name = "flash_attention"
        if block_q is None or block_k is None:
            reason = f"seq_len T={seq} is not a multiple of 16"
        else:
            reason = _prefill_unsupported(q.shape, k.shape, dtypes, block_q, block_k)
        kernel = functools.partial(
            flash_attention, block_q=block_q, block_k=block_k, interpret=mode.interpret
        )
    if reason is not None:
        _warn_fallback(name, reason)
        return attention_reference(q, k, v, segment_ids=segment_ids)
    if segment_ids is None:
        return per_shard(kernel, (q, k, v), ("BTNH", "BTKH", "BTKH"), mesh_axes)

    def segmented(q, k, v, segment_ids):
        return kernel(q, k, v, segment_ids=segment_ids)

    return per_shard(segmented, (q, k, v, segment_ids), ("BTNH", "BTKH", "BTKH", "BT"), mesh_axes)


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
    mode = kernel_mode(impl)
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_rows)
    specs = ("TNH", "KPSH", "KPSH", "R", "RP", "R", "")
    if mode is None:
        if not _native_decode(impl, k_pages.dtype):
            return ragged_paged_attention_blocked(*args, sm_scale=sm_scale)
        # An FFI call is opaque to XLA's partitioner, as a Pallas call is: per shard.
        blocked = functools.partial(
            ragged_paged_attention_blocked, sm_scale=sm_scale, native_decode=True
        )
        return per_shard(blocked, args, specs, mesh_axes)
    page_size = k_pages.shape[2] if k_pages.ndim == 4 else 1
    n_heads = q.shape[-2] if q.ndim == 3 else 1
    n_kv = k_pages.shape[0] if k_pages.ndim == 4 else 1
    dtypes = (q.dtype, k_pages.dtype, v_pages.dtype)
    if mode.family == "mosaic":
        name, fn = "ragged_paged_attention_tpu", ragged_paged_attention_tpu
        block_k = max(_TPU_PAGED_BLOCK_K, page_size)
        block_q = _tpu_auto_block_q(n_heads, n_kv)
        reason = _tpu_paged_unsupported(q.shape, k_pages.shape, dtypes, block_q, block_k)
    else:
        name, fn = "ragged_paged_attention", ragged_paged_attention
        block_k = max(_PAGED_BLOCK_K, page_size)
        block_q = auto_block_q(n_heads, n_kv)
        reason = _paged_unsupported(q.shape, k_pages.shape, dtypes, block_q, block_k)
    if reason is not None:
        _warn_fallback(name, reason)
        return ragged_paged_attention_blocked(*args, sm_scale=sm_scale)
    kernel = functools.partial(
        fn, sm_scale=sm_scale, block_q=block_q, block_k=block_k, interpret=mode.interpret
    )
    return per_shard(kernel, args, specs, mesh_axes)
