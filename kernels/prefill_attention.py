"""Causal grouped-query flash attention (forward) as a Pallas kernel, for prefill and training.

Blocking (see docs/kernels.md):
  grid = (T // block_q, B, N): one program per tile of block_q queries of one query head.
  * The program keeps its [block_q, H] query tile and walks the keys in [block_k, H]
    tiles with an online softmax (running max, running sum, fp32 accumulator).
  * Causality bounds that walk: a query tile ending at position (i+1)*block_q - 1 only
    visits key tiles up to it, so the fully masked tiles above the diagonal are never
    loaded (about half the work of the full square).
  * GQA without repeating K/V: the K/V block index map sends query head n to kv head
    n // G, so the G query heads of a kv head read the same K/V rows.
  * segment_ids (packed documents) are a [T] row per batch entry; a key is visible when it
    is causal *and* in the query's segment. Every query sees at least itself, so no row is
    ever fully masked.

Backward: `flash_attention` is a `jax.custom_vjp` whose backward pass differentiates the
pure-JAX reference (`attention_reference`) - correct and memory-hungry (it rebuilds the
[T, T] logits); a Pallas backward kernel is owed.

The forward follows jax's shipped `pallas.ops.gpu.attention.mha` Triton kernel (grid
order, full-sequence K/V blocks sliced inside the kernel, finite mask value).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import (
    M_INIT,
    MASK_VALUE,
    MIN_TILE,
    compiler_params,
    dot_nn,
    dot_nt,
    dtype_reason,
    head_dim_reason,
    is_pow2,
)
from kernels.reference import attention_reference

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "attention_reference",
    "flash_attention",
    "unsupported_reason",
]

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64


def unsupported_reason(
    q_shape: tuple[int, ...],  # [B, T, N, H]
    kv_shape: tuple[int, ...],  # [B, T, K, H]
    dtypes: tuple[jnp.dtype, ...],
    block_q: int,
    block_k: int,
) -> str | None:
    """Why the kernel cannot take these shapes (None when it can)."""
    if len(q_shape) != 4 or len(kv_shape) != 4:
        return f"rank: q {q_shape} must be [B, T, N, H] and k/v {kv_shape} [B, T, K, H]"
    batch, seq, n_heads, head_dim = q_shape
    if (batch, seq, head_dim) != (kv_shape[0], kv_shape[1], kv_shape[3]):
        return f"q {q_shape} and k/v {kv_shape} disagree on B, T or H"
    n_kv = kv_shape[2]
    if n_kv == 0 or n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}"
    if reason := head_dim_reason(head_dim):
        return reason
    if reason := dtype_reason(*dtypes):
        return reason
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not is_pow2(block) or block < MIN_TILE:
            return f"{name}={block} is not a power of two >= {MIN_TILE}"
        if seq % block:
            return f"seq_len T={seq} is not a multiple of {name}={block}"
    return None


def _flash_kernel(
    q_ref,  # [Bq, H]   one query tile of one head
    k_ref,  # [T, H]    the whole sequence of its kv head
    v_ref,  # [T, H]
    seg_ref,  # [T] int32, or None without segment ids
    o_ref,  # [Bq, H]
    *,
    scale: float,
    block_q: int,
    block_k: int,
):
    q_tile = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    q = q_ref[...]  # [Bq, H]
    q_pos = q_tile * block_q + jnp.arange(block_q)  # [Bq]
    q_seg = None if seg_ref is None else seg_ref[pl.ds(q_tile * block_q, block_q)]  # [Bq]

    def body(t, carry):
        acc, m_prev, l_prev = carry
        tile = pl.ds(t * block_k, block_k)
        k = k_ref[tile, :]  # [Bk, H]
        s = dot_nt(q, k) * scale  # [Bq, Bk] f32
        k_pos = t * block_k + jnp.arange(block_k)  # [Bk]
        mask = q_pos[:, None] >= k_pos[None, :]  # [Bq, Bk]
        if seg_ref is not None:
            mask = mask & (q_seg[:, None] == seg_ref[tile][None, :])
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))  # [Bq]
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])  # [Bq, Bk]
        l_next = correction * l_prev + p.sum(axis=-1)
        v = v_ref[tile, :]  # [Bk, H]
        acc = correction[:, None] * acc + dot_nn(p.astype(v.dtype), v)  # [Bq, H]
        return acc, m_next, l_next

    # Key tiles at or below the diagonal: ceil((q_tile + 1) * block_q / block_k).
    n_tiles = lax.div(block_q * (q_tile + 1) + block_k - 1, block_k)
    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, denom = lax.fori_loop(0, n_tiles, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)  # l >= 1: the diagonal is visible


def _flash_forward(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    segment_ids: jax.Array | None,  # [B, T]
    scale: float,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> jax.Array:  # [B, T, N, H]
    batch, seq, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    kernel = functools.partial(_flash_kernel, scale=scale, block_q=block_q, block_k=block_k)
    if segment_ids is None:
        seg_spec = None
    else:
        segment_ids = segment_ids.astype(jnp.int32)
        seg_spec = pl.BlockSpec((None, seq), lambda i, b, n: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(seq // block_q, batch, n_heads),
        in_specs=[
            pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, seq, None, head_dim), lambda i, b, n: (b, 0, lax.div(n, group), 0)),
            pl.BlockSpec((None, seq, None, head_dim), lambda i, b, n: (b, 0, lax.div(n, group), 0)),
            seg_spec,
        ],
        out_specs=pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="flash_attention_causal",
    )(q, k, v, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret):
    return _flash_forward(
        q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret
    )


def _flash_fwd(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret):
    out = _flash_forward(
        q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret
    )
    return out, (q, k, v, segment_ids)


def _flash_bwd(scale, block_q, block_k, num_warps, num_stages, interpret, residuals, d_out):
    """Backward through the reference: recomputes attention in XLA and differentiates it."""
    del block_q, block_k, num_warps, num_stages, interpret
    q, k, v, segment_ids = residuals
    _, vjp = jax.vjp(
        lambda q, k, v: attention_reference(q, k, v, segment_ids=segment_ids, scale=scale),
        q,
        k,
        v,
    )
    dq, dk, dv = vjp(d_out)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages", "interpret"),
)
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    segment_ids: jax.Array | None = None,  # [B, T]
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H]
    """`attention_reference` (causal, optional segments, GQA) computed by the Pallas kernel.

    Differentiable: the backward pass is the reference's (see the module docstring).
    """
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")
    reason = unsupported_reason(q.shape, k.shape, (q.dtype, k.dtype, v.dtype), block_q, block_k)
    if reason:
        raise ValueError(f"flash_attention: {reason}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(
            f"segment_ids has shape {segment_ids.shape}, expected [B, T]={q.shape[:2]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if num_warps is None:  # the shipped mha kernel's heuristic
        num_warps = 4 if q.shape[-1] <= 64 else 8
    return _flash(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret)
