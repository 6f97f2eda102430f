"""Ragged paged attention (decode rows and prompt chunks in one call) as a Pallas kernel.

The arguments and their meaning are `ragged_paged_attention_reference`'s (paged_reference.py):
q [T, N, H] packed row after row, a page pool k/v [K, P, Ps, H], a page table per row.

Blocking (see docs/kernels.md):
  * Query blocks. Each row's queries are cut into blocks of `block_q` tokens (a decode
    row is one block with one real token); a block belongs to exactly one row. There are
    at most T // block_q + min(R, T) of them, a static bound, so the grid is static and
    blocks past the real ones exit at once. Which row, which positions and how many real
    tokens each block has is computed in XLA before the call (a few [R]- and [blocks]-
    sized ops), so the kernel needs no search.
  * grid = (blocks, K): one program per query block and kv head. Its query tile is the
    block's tokens times the G query heads of that kv head, [block_q * Gp, H] (G padded
    to a power of two Gp; block_q * Gp >= 16 rows for tl.dot), so each K/V byte is read
    once for all heads of the group and all tokens of the block.
  * The program walks its row's page table in tiles of block_k keys (block_k // Ps
    pages, gathered from the kv head's pool by page index, as jax's GPU
    `paged_attention` does) with an online softmax. The trip count is the tiles up to the
    block's last query position: keys past it are never loaded, so the work follows the
    real lengths (a prompt chunk also skips what causality hides from its early blocks).
  * Query row m of the tile is token m // Gp of the block; key s is visible when
    s <= that token's position. V entries past the block's last position are zeroed
    before the PV product, so whatever a recycled page holds there cannot reach the
    output (0 * NaN would).
  * The output tiles go back to [T, N, H] by one XLA gather; padding tokens get zeros.
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
from tandem.kernels.paged_reference import (
    check_row_arrays,
    pack_query_blocks,
    query_blocks,
    ragged_paged_attention_reference,
    step_rows,
    unpack_query_blocks,
)

__all__ = [
    "DEFAULT_BLOCK_K",
    "auto_block_q",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "unsupported_reason",
]

DEFAULT_BLOCK_K = 64
_TILE_ROWS = 32  # query rows (tokens x heads) per program that auto_block_q aims for


def auto_block_q(n_heads: int, n_kv: int) -> int:
    """Query tokens per block: enough that the tile has 32 rows (tokens x padded heads),
    at least one. A decode row fills one token of its block; the rest is padding work on
    the same K/V bytes, so the tile stays small."""
    return max(1, _TILE_ROWS // next_pow2(max(1, n_heads // max(1, n_kv))))


def unsupported_reason(
    q_shape: tuple[int, ...],  # [T, N, H]
    pages_shape: tuple[int, ...],  # [K, P, Ps, H]
    dtypes: tuple[jnp.dtype, ...],
    block_q: int,
    block_k: int,
) -> str | None:
    """Why the kernel cannot take these shapes (None when it can).

    The dispatcher falls back to the reference on a reason; the wrapper raises on one.
    """
    if len(q_shape) != 3 or len(pages_shape) != 4:
        return f"rank: q {q_shape} must be [T, N, H] and the pages {pages_shape} [K, P, Ps, H]"
    _, n_heads, head_dim = q_shape
    n_kv, _, page_size, p_head_dim = pages_shape
    if head_dim != p_head_dim:
        return f"q {q_shape} and pages {pages_shape} disagree on H"
    if n_kv == 0 or n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}"
    if reason := head_dim_reason(head_dim):
        return reason
    if reason := dtype_reason(*dtypes):
        return reason
    if not is_pow2(block_k) or block_k < MIN_TILE:
        return f"block_k={block_k} is not a power of two >= {MIN_TILE}"
    if block_k % page_size:
        return f"page_size={page_size} does not divide block_k={block_k}"
    rows = block_q * next_pow2(n_heads // n_kv)
    if not is_pow2(block_q) or rows < MIN_TILE:
        return (
            f"block_q={block_q} x padded group {next_pow2(n_heads // n_kv)} = {rows} query "
            f"rows is not a power of two >= {MIN_TILE}"
        )
    return None


def _paged_kernel(
    start_ref,  # []             position of the block's first query token
    count_ref,  # []             real query tokens in the block (0: a padding block)
    pages_ref,  # [Pr]           the page table of the block's row
    q_ref,  # [M, H]             block_q tokens x Gp heads of one kv head
    k_ref,  # [P, Ps, H]         this kv head's page pool
    v_ref,  # [P, Ps, H]
    o_ref,  # [M, H]
    *,
    scale: float,
    group: int,  # Gp
    block_k: int,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[-2]
    pages_per_tile = block_k // page_size
    start, count = start_ref[()], count_ref[()]
    end = start + count  # keys [0, end) are the most any query of the block sees
    n_tiles = jnp.where(count > 0, pl.cdiv(end, block_k), 0)
    n_tiles = jnp.minimum(n_tiles, pages_ref.shape[0] // pages_per_tile)
    q = q_ref[...]  # [M, H]
    query_pos = start + jnp.arange(rows) // group  # [M]
    offsets = jnp.arange(block_k)

    def body(t, carry):
        acc, m_prev, l_prev = carry
        pages = pages_ref[pl.ds(t * pages_per_tile, pages_per_tile)]  # [Pt]
        key_pos = t * block_k + offsets  # [Bk]
        k = k_ref[pages].reshape(block_k, head_dim)  # [Bk, H]
        s = dot_nt(q, k) * scale  # [M, Bk] f32
        s = jnp.where(key_pos[None, :] <= query_pos[:, None], s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))  # [M]
        correction = jnp.exp(m_prev - m_next)  # [M]
        p = jnp.exp(s - m_next[:, None])  # [M, Bk]
        l_next = correction * l_prev + p.sum(axis=-1)
        v = v_ref[pages].reshape(block_k, head_dim)  # [Bk, H]
        v = jnp.where((key_pos < end)[:, None], v, jnp.zeros_like(v))
        acc = correction[:, None] * acc + dot_nn(p.astype(v.dtype), v)  # [M, H]
        return acc, m_next, l_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), M_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, _, denom = lax.fori_loop(0, n_tiles, body, init)
    denom = jnp.where(denom > 0, denom, 1.0)  # a padding block: acc is 0
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_q", "block_k", "num_warps", "num_stages", "interpret"),
)
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,  # [K, P, Ps, H]
    kv_lens: jax.Array,  # [R] int32
    page_indices: jax.Array,  # [R, Pr] int32
    cu_q_lens: jax.Array,  # [R + 1] int32
    num_rows: jax.Array,  # [] int32
    *,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """`ragged_paged_attention_reference`, computed by the Pallas kernel.

    Args:
      block_q: query tokens per program; None picks `auto_block_q`. block_q x Gp must be a
        power of two >= 16.
      block_k: keys per tile (a power of two >= 16, a multiple of the page size).
      num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
      interpret: run the kernel with the Pallas interpreter (CPU tests).
    """
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    n_tokens, n_heads, head_dim = q.shape if q.ndim == 3 else (0, 0, 0)
    n_kv = k_pages.shape[0] if k_pages.ndim == 4 else 1
    if block_q is None:
        block_q = auto_block_q(n_heads, max(n_kv, 1))
    reason = unsupported_reason(
        q.shape, k_pages.shape, (q.dtype, k_pages.dtype, v_pages.dtype), block_q, block_k
    )
    if reason:
        raise ValueError(f"ragged_paged_attention: {reason}")
    check_row_arrays(kv_lens, page_indices, cu_q_lens, num_rows)
    page_size = k_pages.shape[2]
    group = n_heads // n_kv
    padded_group = next_pow2(group)
    rows = block_q * padded_group
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    kv_lens, cu_q_lens = kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32)
    num_rows = num_rows.astype(jnp.int32)

    cu, q_len = step_rows(cu_q_lens, num_rows)
    blocks = query_blocks(cu, q_len, kv_lens, n_tokens, block_q)
    qb = pack_query_blocks(q, blocks, n_kv, padded_group, block_q)  # [Qb, K, M, H]
    n_blocks = qb.shape[0]
    pages_per_tile = block_k // page_size
    page_table = page_indices.astype(jnp.int32)[blocks.row]  # [Qb, Pr]
    # A row's last tile may cover table entries past its pages, which may hold anything:
    # clamp them into the pool (what they point at is masked) and pad to whole tiles.
    page_table = jnp.clip(page_table, 0, k_pages.shape[1] - 1)
    pad = -page_table.shape[1] % pages_per_tile
    page_table = jnp.pad(page_table, ((0, 0), (0, pad)))

    kernel = functools.partial(_paged_kernel, scale=scale, group=padded_group, block_k=block_k)
    pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, h: (h, 0, 0, 0))
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(n_blocks, n_kv),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h: (b,)),
            pl.BlockSpec((None,), lambda b, h: (b,)),
            pl.BlockSpec((None, page_table.shape[1]), lambda b, h: (b, 0)),
            tile_spec,
            pool_spec,
            pool_spec,
        ],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct((n_blocks, n_kv, rows, head_dim), q.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(blocks.start, blocks.count, page_table, qb, k_pages, v_pages)

    return unpack_query_blocks(out, blocks, cu, n_tokens, n_heads, block_q)
