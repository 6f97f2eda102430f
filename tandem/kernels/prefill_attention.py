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

Backward (FlashAttention-2): the forward also saves each query's log-sum-exp, so the
backward recomputes the probabilities tile by tile instead of materialising [T, T]:
  * delta = rowsum(dO * O) (one fused XLA op).
  * dK/dV kernel, grid = (T // block_k, B, N): one program per key tile and *query* head
    walks the query tiles from the diagonal down, accumulating dV += P^T dO and
    dK += dS^T Q in fp32 (dS = P * (dO V^T - delta)).
  * dQ kernel, grid = (T // block_q, B, N): one program per query tile walks the key
    tiles up to the diagonal, accumulating dQ += dS K.
  GQA: dK/dV come out per query head ([B, T, N, H], fp32) and are summed over each kv
  head's group in XLA (FlashAttention-2's GQA backward does the same), so no program
  writes another's rows.

Forward and backward follow jax's shipped `pallas.ops.gpu.attention.mha` Triton kernels
(grid order, full-sequence blocks sliced inside the kernel, finite mask value, separate
dK/dV and dQ kernels), extended with GQA and packed segments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tandem.kernels._common import (
    M_INIT,
    MASK_VALUE,
    MIN_TILE,
    compiler_params,
    dot_nn,
    dot_nt,
    dot_tn,
    dtype_reason,
    head_dim_reason,
    is_pow2,
)
from tandem.kernels.reference import attention_reference, attention_shape_reason

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
    if reason := attention_shape_reason(q_shape, kv_shape):
        return reason
    _, seq, _, head_dim = q_shape
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
    lse_ref,  # [Bq] f32 log-sum-exp of each query's scores (for the backward), or None
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
    acc, m, denom = lax.fori_loop(0, n_tiles, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)  # l >= 1: the diagonal is visible
    if lse_ref is not None:
        lse_ref[...] = m + jnp.log(denom)


def _seg_spec(segment_ids: jax.Array | None, seq: int):
    """The [T] segment row of batch entry b (None without segments)."""
    return None if segment_ids is None else pl.BlockSpec((None, seq), lambda i, b, n: (b, 0))


# BlockSpecs over grid (tile i, batch b, query head n), shared by the three kernels. A
# "tile" spec follows the grid's tile index; a "seq" spec is the whole sequence (block 0),
# sliced inside the kernel.
def _head_tile_spec(block: int, head_dim: int) -> pl.BlockSpec:
    """Rows [i*block, (i+1)*block) of query head n (q, dO, O, dQ, per-head dK/dV)."""
    return pl.BlockSpec((None, block, None, head_dim), lambda i, b, n: (b, i, n, 0))


def _head_seq_spec(seq: int, head_dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, seq, None, head_dim), lambda i, b, n: (b, 0, n, 0))


def _kv_tile_spec(block: int, head_dim: int, group: int) -> pl.BlockSpec:
    """Rows of query head n's kv head, n // group: GQA without repeating K/V."""
    return pl.BlockSpec((None, block, None, head_dim), lambda i, b, n: (b, i, lax.div(n, group), 0))


def _kv_seq_spec(seq: int, head_dim: int, group: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, seq, None, head_dim), lambda i, b, n: (b, 0, lax.div(n, group), 0))


def _row_tile_spec(block: int) -> pl.BlockSpec:
    """Entries of a per-(b, n) [T] row (lse, delta)."""
    return pl.BlockSpec((None, None, block), lambda i, b, n: (b, n, i))


def _row_seq_spec(seq: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, seq), lambda i, b, n: (b, n, 0))


def _flash_forward(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    segment_ids: jax.Array | None,  # [B, T] int32
    scale: float,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    *,
    with_lse: bool,
) -> tuple[jax.Array, jax.Array | None]:  # out [B, T, N, H], lse [B, N, T] f32 or None
    batch, seq, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    kernel = functools.partial(_flash_kernel, scale=scale, block_q=block_q, block_k=block_k)
    if not with_lse:
        kernel = functools.partial(kernel, lse_ref=None)
    kv_spec = _kv_seq_spec(seq, head_dim, group)
    q_tile_spec = _head_tile_spec(block_q, head_dim)
    out_specs = [q_tile_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_lse:
        out_specs.append(_row_tile_spec(block_q))
        out_shape.append(jax.ShapeDtypeStruct((batch, n_heads, seq), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=(seq // block_q, batch, n_heads),
        in_specs=[q_tile_spec, kv_spec, kv_spec, _seg_spec(segment_ids, seq)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="flash_attention_causal",
    )(q, k, v, segment_ids)
    return outs[0], (outs[1] if with_lse else None)


def _visible(q_pos, k_pos, q_seg, k_seg):
    """[Bq, Bk] causal (and same-document) visibility."""
    mask = q_pos[:, None] >= k_pos[None, :]
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


def _probs_and_dscores(q, k, v, do, lse, delta, mask, scale):
    """P = softmax probabilities (recomputed from the saved lse) and dS, both [Bq, Bk] f32."""
    s = dot_nt(q, k) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (dot_nt(do, v) - delta[:, None])
    return p, ds


def _dkdv_kernel(
    q_ref,  # [T, H]   the whole sequence of one query head
    k_ref,  # [Bk, H]  one key tile of its kv head
    v_ref,  # [Bk, H]
    do_ref,  # [T, H]
    lse_ref,  # [T] f32
    delta_ref,  # [T] f32
    seg_ref,  # [T] int32, or None
    dk_ref,  # [Bk, H] f32, this query head's share of dK
    dv_ref,  # [Bk, H] f32
    *,
    scale: float,
    block_q: int,
    block_k: int,
):
    k_tile = pl.program_id(0)
    head_dim = k_ref.shape[-1]
    k, v = k_ref[...], v_ref[...]
    k_pos = k_tile * block_k + jnp.arange(block_k)
    k_seg = None if seg_ref is None else seg_ref[pl.ds(k_tile * block_k, block_k)]

    def body(t, carry):
        dk, dv = carry
        tile = pl.ds(t * block_q, block_q)
        q, do = q_ref[tile, :], do_ref[tile, :]
        q_seg = None if seg_ref is None else seg_ref[tile]
        mask = _visible(t * block_q + jnp.arange(block_q), k_pos, q_seg, k_seg)
        p, ds = _probs_and_dscores(q, k, v, do, lse_ref[tile], delta_ref[tile], mask, scale)
        dv = dv + dot_tn(p.astype(do.dtype), do)
        dk = dk + dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    # Query tiles at or below the diagonal: from the one holding this tile's first key.
    first = lax.div(k_tile * block_k, block_q)
    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(first, q_ref.shape[0] // block_q, body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(
    q_ref,  # [Bq, H]  one query tile of one head
    k_ref,  # [T, H]   the whole sequence of its kv head
    v_ref,  # [T, H]
    do_ref,  # [Bq, H]
    lse_ref,  # [Bq] f32
    delta_ref,  # [Bq] f32
    seg_ref,  # [T] int32, or None
    dq_ref,  # [Bq, H]
    *,
    scale: float,
    block_q: int,
    block_k: int,
):
    q_tile = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = q_tile * block_q + jnp.arange(block_q)
    q_seg = None if seg_ref is None else seg_ref[pl.ds(q_tile * block_q, block_q)]

    def body(t, dq):
        tile = pl.ds(t * block_k, block_k)
        k = k_ref[tile, :]
        k_seg = None if seg_ref is None else seg_ref[tile]
        mask = _visible(q_pos, t * block_k + jnp.arange(block_k), q_seg, k_seg)
        _, ds = _probs_and_dscores(q, k, v_ref[tile, :], do, lse, delta, mask, scale)
        return dq + dot_nn(ds.astype(k.dtype), k)

    n_tiles = lax.div(block_q * (q_tile + 1) + block_k - 1, block_k)
    dq = lax.fori_loop(0, n_tiles, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _flash_backward(
    q, k, v, segment_ids, out, lse, d_out, scale, block_q, block_k, num_warps, num_stages,
    interpret,
):  # fmt: skip
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    delta = jnp.einsum(  # [B, N, T]
        "btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32)
    )
    params = compiler_params(num_warps, num_stages)
    seg_spec = _seg_spec(segment_ids, seq)
    head_seq = _head_seq_spec(seq, head_dim)
    row_seq = _row_seq_spec(seq)
    k_tile = _kv_tile_spec(block_k, head_dim, group)
    k_tile_out = _head_tile_spec(block_k, head_dim)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, block_k=block_k),
        grid=(seq // block_k, batch, n_heads),
        in_specs=[head_seq, k_tile, k_tile, head_seq, row_seq, row_seq, seg_spec],
        out_specs=[k_tile_out, k_tile_out],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_causal_dkdv",
    )(q, k, v, d_out, lse, delta, segment_ids)
    q_tile = _head_tile_spec(block_q, head_dim)
    row_tile = _row_tile_spec(block_q)
    kv_seq = _kv_seq_spec(seq, head_dim, group)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k),
        grid=(seq // block_q, batch, n_heads),
        in_specs=[q_tile, kv_seq, kv_seq, q_tile, row_tile, row_tile, seg_spec],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_causal_dq",
    )(q, k, v, d_out, lse, delta, segment_ids)

    def per_kv_head(d):  # [B, T, N, H] f32 -> [B, T, K, H], summed over each group
        return d.reshape(batch, seq, n_kv, group, head_dim).sum(axis=3).astype(k.dtype)

    return dq, per_kv_head(dk), per_kv_head(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret):
    out, _ = _flash_forward(
        q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret,
        with_lse=False,
    )  # fmt: skip
    return out


def _flash_fwd(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret):
    out, lse = _flash_forward(
        q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret,
        with_lse=True,
    )  # fmt: skip
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, block_q, block_k, num_warps, num_stages, interpret, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = _flash_backward(
        q, k, v, segment_ids, out, lse, d_out, scale, block_q, block_k, num_warps,
        num_stages, interpret,
    )  # fmt: skip
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

    Differentiable: the backward pass is the Pallas FlashAttention-2 backward (see the
    module docstring).
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
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if num_warps is None:  # the shipped mha kernel's heuristic
        num_warps = 4 if q.shape[-1] <= 64 else 8
    return _flash(q, k, v, segment_ids, scale, block_q, block_k, num_warps, num_stages, interpret)
