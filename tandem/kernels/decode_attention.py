"""Ragged grouped-query decode attention (flash-decoding) as a Pallas kernel.

One decode step: every slot b has one query token (N heads) and attends to the first
`lengths[b]` entries of its KV cache, stored as k/v [B, K, S, H] so one (slot, kv head)
row is a contiguous [S, H] slab.

Blocking (see docs/kernels.md):
  grid = (B, K, P): one program per slot, kv head and split of S into P equal parts.
  * The G = N // K query heads that share a kv head are one [Gp, H] tile (Gp = G padded
    up to a power of two >= 16, because tl.dot needs >= 16 rows), so each K/V byte is
    read once for all G heads; K/V are never repeated.
  * Inside a program, a loop walks the split in [block_k, H] tiles with an online softmax
    (running max m, running sum l, unnormalized fp32 accumulator acc). Its trip count is
    computed from lengths[b], so tiles past the slot's length are never loaded: the work
    is proportional to the real length, not to S.
  * The P partial (m, l, acc) triples are merged outside the kernel with a log-sum-exp
    combine: m* = max_p m_p, out = sum_p e^(m_p - m*) acc_p / sum_p e^(m_p - m*) l_p.
    An empty split keeps m = float32 min and l = 0, so it weighs exactly 0; a slot with
    length 0 has total l = 0 and returns zeros.

Patterns (scalar length block, dynamic-bound fori_loop, finite mask values, optimization
barrier before the combine) follow jax's shipped `pallas.ops.gpu.decode_attention`, whose
Triton lowering is known to compile. This kernel differs in taking the cache layout as is
([B, K, S, H], no transpose), in ragged per-slot lengths, and in one grid axis for B and K
instead of two nested vmaps.
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
    dtype_reason,
    head_dim_reason,
    is_pow2,
    next_pow2,
)
from tandem.kernels.reference import decode_attention_reference

__all__ = [
    "DEFAULT_BLOCK_K",
    "auto_num_splits",
    "decode_attention_reference",
    "ragged_decode_attention",
    "unsupported_reason",
]

DEFAULT_BLOCK_K = 128
_TARGET_PROGRAMS = 256  # ~2 programs per SM on an H100 (132 SMs); see auto_num_splits


def unsupported_reason(
    q_shape: tuple[int, ...],  # [B, N, H]
    cache_shape: tuple[int, ...],  # [B, K, S, H]
    dtypes: tuple[jnp.dtype, ...],
    block_k: int,
) -> str | None:
    """Why the kernel cannot take these shapes (None when it can).

    The dispatcher falls back to the reference on a reason; the wrapper raises on one.
    """
    if len(q_shape) != 3 or len(cache_shape) != 4:
        return f"rank: q {q_shape} must be [B, N, H] and the cache {cache_shape} [B, K, S, H]"
    batch, n_heads, head_dim = q_shape
    c_batch, n_kv, max_len, c_head_dim = cache_shape
    if (batch, head_dim) != (c_batch, c_head_dim):
        return f"q {q_shape} and cache {cache_shape} disagree on B or H"
    if n_kv == 0 or n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}"
    if reason := head_dim_reason(head_dim):
        return reason
    if reason := dtype_reason(*dtypes):
        return reason
    if not is_pow2(block_k) or block_k < MIN_TILE:
        return f"block_k={block_k} is not a power of two >= {MIN_TILE}"
    if max_len % block_k:
        return f"max_len S={max_len} is not a multiple of block_k={block_k}"
    return None


def auto_num_splits(batch: int, n_kv: int, max_len: int, block_k: int) -> int:
    """Splits of S per (slot, kv head): enough programs to fill the GPU, no more.

    Small batch x kv heads needs many splits (flash-decoding's point); large ones need
    few, since each split costs a partial write and a share of the combine. The result
    divides S // block_k so every split holds whole tiles.
    """
    n_tiles = max_len // block_k
    want = max(1, -(-_TARGET_PROGRAMS // (batch * n_kv)))
    splits = min(n_tiles, next_pow2(want))
    while n_tiles % splits:
        splits -= 1
    return splits


def _decode_kernel(
    lengths_ref,  # []        valid cache entries of this slot
    q_ref,  # [Gp, H]         the query heads of one kv head, zero-padded to Gp rows
    k_ref,  # [Sp, H]         this split of the slot's K cache (Sp = S // P)
    v_ref,  # [Sp, H]
    acc_ref,  # [Gp, H] f32   unnormalized output of this split
    m_ref,  # [Gp] f32        running max of the logits
    l_ref,  # [Gp] f32        sum of exp(logit - m)
    *,
    scale: float,
    block_k: int,
):
    split_len = k_ref.shape[-2]
    group, head_dim = q_ref.shape
    split_start = pl.program_id(2) * split_len
    length = lengths_ref[()]
    # Tiles of this split that hold at least one valid entry; 0 when the split starts past
    # the slot's length, so those tiles are never read.
    n_tiles = jnp.minimum(
        jnp.maximum(pl.cdiv(length - split_start, block_k), 0), split_len // block_k
    )
    q = q_ref[...]  # [Gp, H]
    offsets = jnp.arange(block_k)

    def body(t, carry):
        acc, m_prev, l_prev = carry
        tile = pl.ds(t * block_k, block_k)
        k = k_ref[tile, :]  # [Bk, H]
        s = dot_nt(q, k) * scale  # [Gp, Bk] f32
        valid = (split_start + t * block_k + offsets) < length  # [Bk]
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))  # [Gp]
        correction = jnp.exp(m_prev - m_next)  # [Gp]
        p = jnp.exp(s - m_next[:, None])  # [Gp, Bk]
        l_next = correction * l_prev + p.sum(axis=-1)
        v = v_ref[tile, :]  # [Bk, H]
        acc = correction[:, None] * acc + dot_nn(p.astype(v.dtype), v)  # [Gp, H]
        return acc, m_next, l_next

    init = (
        jnp.zeros((group, head_dim), jnp.float32),
        jnp.full((group,), M_INIT, jnp.float32),
        jnp.zeros((group,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, n_tiles, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = denom


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_k", "num_splits", "num_warps", "num_stages", "interpret"),
)
def ragged_decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, K, S, H]
    v_cache: jax.Array,  # [B, K, S, H]
    lengths: jax.Array,  # [B] int32
    *,
    scale: float | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [B, N, H]
    """Decode attention of `decode_attention_reference`, computed by the Pallas kernel.

    Args:
      block_k: keys per tile (power of two >= 16 dividing S).
      num_splits: parallel splits of S per (slot, kv head); None picks `auto_num_splits`.
        Must divide S // block_k.
      num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
      interpret: run the kernel with the Pallas interpreter (CPU tests).
    """
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache has shape {k_cache.shape}: expected [B, K, S, H]")
    reason = unsupported_reason(
        q.shape, k_cache.shape, (q.dtype, k_cache.dtype, v_cache.dtype), block_k
    )
    if reason:
        raise ValueError(f"ragged_decode_attention: {reason}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths has shape {lengths.shape}, expected [B]=({q.shape[0]},)")
    batch, n_heads, head_dim = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    n_tiles = max_len // block_k
    if num_splits is None:
        num_splits = auto_num_splits(batch, n_kv, max_len, block_k)
    if num_splits < 1 or n_tiles % num_splits:
        raise ValueError(f"num_splits={num_splits} must divide S // block_k = {n_tiles}")
    split_len = max_len // num_splits
    scale = head_dim**-0.5 if scale is None else scale
    padded_group = max(MIN_TILE, next_pow2(group))

    qg = q.reshape(batch, n_kv, group, head_dim)  # [B, K, G, H]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))  # [B, K, Gp, H]
    lengths = lengths.astype(jnp.int32)

    cache_spec = pl.BlockSpec((None, None, split_len, head_dim), lambda b, h, p: (b, h, p, 0))

    kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k)
    acc, m, denom = pl.pallas_call(
        kernel,
        grid=(batch, n_kv, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, p: (b,)),
            pl.BlockSpec((None, None, padded_group, head_dim), lambda b, h, p: (b, h, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec(
                (None, None, None, padded_group, head_dim), lambda b, h, p: (b, h, p, 0, 0)
            ),
            pl.BlockSpec((None, None, None, padded_group), lambda b, h, p: (b, h, p, 0)),
            pl.BlockSpec((None, None, None, padded_group), lambda b, h, p: (b, h, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, n_kv, num_splits, padded_group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, n_kv, num_splits, padded_group), jnp.float32),
            jax.ShapeDtypeStruct((batch, n_kv, num_splits, padded_group), jnp.float32),
        ],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_decode_attention",
    )(lengths, qg, k_cache, v_cache)
    # acc [B, K, P, Gp, H]; m, l [B, K, P, Gp]

    out = _combine_splits(acc, m, denom)  # [B, K, Gp, H] f32
    out = out[:, :, :group].reshape(batch, n_heads, head_dim)  # [B, N, H]
    return out.astype(q.dtype)


def _combine_splits(
    acc: jax.Array,  # [B, K, P, Gp, H] f32
    m: jax.Array,  # [B, K, P, Gp] f32
    denom: jax.Array,  # [B, K, P, Gp] f32: the partial sums l
) -> jax.Array:  # [B, K, Gp, H] f32
    """Log-sum-exp merge of the per-split partial softmaxes (empty splits weigh 0)."""
    m_max = m.max(axis=2, keepdims=True)  # [B, K, 1, Gp]
    # Same barrier as jax's shipped decode kernel (b/389925439: NaNs after jit without it).
    m_max = lax.optimization_barrier(m_max)
    weight = jnp.exp(m - m_max)  # [B, K, P, Gp]
    total = (weight * denom).sum(axis=2)  # [B, K, Gp]
    out = (weight[..., None] * acc).sum(axis=2)  # [B, K, Gp, H]
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total[..., None] > 0, out / safe[..., None], 0.0)
