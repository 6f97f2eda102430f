"""Ragged paged attention (decode rows and prompt chunks in one call) as a Pallas TPU
(Mosaic) kernel, on tandem's page pool `[K, P, Ps, H]`.

The arguments and their meaning are `ragged_paged_attention_reference`'s
(paged_reference.py); the blocking is the Triton kernel's (paged_attention.py): each
row's queries cut into blocks of `block_q` tokens (`query_blocks`), one program per query
block and kv head, whose query tile is the block's tokens times the kv head's (padded)
group of query heads, `[M, H]`, walking the row's page table tile by tile with an online
softmax up to the block's last query position. What differs is how pages reach the core:

  * The pools stay in HBM (`memory_space=pl.ANY`). A tile of `block_k` keys is
    `block_k / Ps` pages, each one DMA of a contiguous `[Ps, H]` slab (kv head h, page p)
    into a row range of a `[2, block_k, H]` VMEM buffer, as jax's TPU `paged_attention`
    fetches the same layout. Tiles are double-buffered: tile t + 1's copies are started
    before tile t is waited on and computed.
  * The page table (`[R * Pr]`, flat: a 2-D SMEM array is padded per row) and each
    block's row, first position and real token count are scalar-prefetched into SMEM, so
    the copies' addresses and the trip count are known before the body runs.
  * Masks come from 2-D iotas; m and l are `[M, 1]` f32 columns.

Why not jax's `ragged_paged_attention` (ops/tpu) or tpu-inference's RPA v3: both read a
pool that interleaves K and V heads per page, `[P, Ps, 2K, H]` (v3 also packs sub-32-bit
heads and pads H to 128), while tandem's pool is kv-head-major with K and V apart, the
layout of jax's GPU and TPU `paged_attention`, `write_pages`, the Triton kernel, the CPU
path and the engine. Converting at the call boundary would copy every layer's whole pool
on every step, far more bytes than attention reads; docs/kernels.md has the comparison.
jax's `ragged_paged_attention` also does not run in TPU interpret mode on jax 0.10.2 (its
`ref.reshape` is not supported by the interpreter), so it could not be tested here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tandem.kernels._common import M_INIT, MASK_VALUE, is_pow2, next_pow2
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
    "ragged_paged_attention_reference",
    "ragged_paged_attention_tpu",
    "unsupported_reason",
]

DEFAULT_BLOCK_K = 128  # keys per tile: one lane-width of scores per query row
LANES = 128
_TILE_ROWS = 64  # query rows (tokens x padded heads) per program that auto_block_q aims for
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def sublanes(dtype: jnp.dtype) -> int:
    """Rows of one native VMEM tile: 8 for 32-bit values, 16 for bf16 (packed in pairs)."""
    return 8 * 4 // jnp.dtype(dtype).itemsize


def auto_block_q(n_heads: int, n_kv: int) -> int:
    """Query tokens per block: a tile of 64 rows (tokens x padded heads), at least one."""
    return max(1, _TILE_ROWS // next_pow2(max(1, n_heads // max(1, n_kv))))


def unsupported_reason(
    q_shape: tuple[int, ...],  # [T, N, H]
    pages_shape: tuple[int, ...],  # [K, P, Ps, H]
    dtypes: tuple[jnp.dtype, ...],
    block_q: int,
    block_k: int,
) -> str | None:
    """Why the kernel cannot take these shapes (None when it can): Mosaic's tiling.

    H must fill whole 128-lane vregs (as jax's TPU `paged_attention` tests and RPA v3's
    cache layout assume; H = 64 would waste half of every VMEM tile and HBM page), a page
    must be whole sublane tiles (8 rows, 16 for bf16) so it can be DMA'd into a row range
    of the tile buffer, and a tile is whole pages and whole lanes of scores.
    """
    if len(q_shape) != 3 or len(pages_shape) != 4:
        return f"rank: q {q_shape} must be [T, N, H] and the pages {pages_shape} [K, P, Ps, H]"
    _, n_heads, head_dim = q_shape
    n_kv, _, page_size, p_head_dim = pages_shape
    if head_dim != p_head_dim:
        return f"q {q_shape} and pages {pages_shape} disagree on H"
    if n_kv == 0 or n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}"
    if head_dim % LANES:
        return f"head_dim={head_dim} is not a multiple of {LANES} (TPU lanes)"
    names = [jnp.dtype(dt) for dt in dtypes]
    if any(dt not in _DTYPES for dt in names) or len(set(names)) != 1:
        return f"dtypes {[dt.name for dt in names]} (supported: all float32 or all bfloat16)"
    tile = sublanes(names[0])
    if page_size % tile:
        return f"page_size={page_size} is not a multiple of {tile} ({names[0].name} sublanes)"
    if block_k % page_size or block_k % LANES:
        return f"block_k={block_k} is not a multiple of page_size={page_size} and of {LANES}"
    if not is_pow2(block_q):
        return f"block_q={block_q} is not a power of two"
    return None


def _paged_kernel(
    # scalar prefetch (SMEM)
    start_ref,  # [Qb]          position of each block's first query token
    count_ref,  # [Qb]          real query tokens per block (0: a padding block)
    row_ref,  # [Qb]            each block's row
    table_ref,  # [R * Prp]     page tables, flat, padded to whole tiles, clamped into the pool
    # inputs
    q_ref,  # [M, H]            block_q tokens x Gp heads of one kv head (VMEM)
    k_hbm,  # [K, P, Ps, H]     the pools (HBM)
    v_hbm,  # [K, P, Ps, H]
    # output
    o_ref,  # [M, H]
    # scratch
    k_buf,  # [2, Bk, H]        double-buffered key tile
    v_buf,  # [2, Bk, H]
    sems,  # DMA semaphores [2 (k, v), 2 (buffer)]
    *,
    scale: float,
    group_shift: int,  # log2(Gp): query row m is token m >> group_shift of the block
    block_k: int,
    pages_per_row: int,  # Prp
):
    block, head = pl.program_id(0), pl.program_id(1)
    rows, head_dim = q_ref.shape
    page_size = k_hbm.shape[2]
    pages_per_tile = block_k // page_size
    start, count = start_ref[block], count_ref[block]
    table_base = row_ref[block] * pages_per_row
    end = start + count  # keys [0, end) are the most any query of the block sees
    n_tiles = jnp.where(count > 0, lax.div(end + block_k - 1, block_k), 0)
    n_tiles = jnp.minimum(n_tiles, pages_per_row // pages_per_tile)

    def copies(tile, slot):
        """The DMAs of one tile: per page, its [Ps, H] slab of K and of V."""
        out = []
        for i in range(pages_per_tile):
            page = table_ref[table_base + tile * pages_per_tile + i]
            rows_of_page = pl.ds(i * page_size, page_size)
            for pool, buf, kind in ((k_hbm, k_buf, 0), (v_hbm, v_buf, 1)):
                out.append(
                    pltpu.make_async_copy(
                        pool.at[head, page], buf.at[slot, rows_of_page], sems.at[kind, slot]
                    )
                )
        return out

    @pl.when(n_tiles > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    q = q_ref[...]  # [M, H]
    query_pos = start + lax.shift_right_logical(
        lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group_shift
    )  # [M, Bk]
    key_offset = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)  # [M, Bk]
    value_offset = lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)  # [Bk, H]

    def body(t, carry):
        acc, m_prev, l_prev = carry  # [M, H], [M, 1], [M, 1] f32
        slot = lax.rem(t, 2)  # not jnp's %, whose sign fix-up needs the TPU generation

        @pl.when(t + 1 < n_tiles)
        def _():
            for c in copies(t + 1, 1 - slot):
                c.start()

        for c in copies(t, slot):
            c.wait()
        k = k_buf[slot]  # [Bk, H]
        v = v_buf[slot]  # [Bk, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(t * block_k + key_offset <= query_pos, s * scale, MASK_VALUE)  # [M, Bk]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [M, 1]
        correction = jnp.exp(m_prev - m_next)  # [M, 1]
        p = jnp.exp(s - m_next)  # [M, Bk]
        l_next = correction * l_prev + p.sum(axis=1, keepdims=True)
        # Slots past the block's last position may hold anything (a recycled page, or
        # NaN): zero them so 0 * NaN cannot reach the output.
        v = jnp.where(t * block_k + value_offset < end, v, jnp.zeros_like(v))
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [M, H]
        return correction * acc + pv, m_next, l_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows, 1), M_INIT, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )
    acc, _, denom = lax.fori_loop(0, n_tiles, body, init)
    denom = jnp.where(denom > 0, denom, 1.0)  # a padding block: acc is 0
    o_ref[...] = (acc / denom).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "interpret"))
def ragged_paged_attention_tpu(
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
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """`ragged_paged_attention_reference`, computed by the Mosaic kernel.

    Args:
      block_q: query tokens per program (a power of two); None picks `auto_block_q`.
      block_k: keys per tile (a multiple of the page size and of 128).
      interpret: run in Pallas' TPU interpret mode (`pltpu.InterpretParams`: DMAs,
        semaphores and VMEM simulated on CPU, uninitialized memory NaN, out-of-bounds
        reads raise): how the CPU tests run it.
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
        raise ValueError(f"ragged_paged_attention_tpu: {reason}")
    check_row_arrays(kv_lens, page_indices, cu_q_lens, num_rows)
    n_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    padded_group = next_pow2(n_heads // n_kv)
    rows = block_q * padded_group
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    kv_lens, cu_q_lens = kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32)

    cu, q_len = step_rows(cu_q_lens, num_rows.astype(jnp.int32))
    blocks = query_blocks(cu, q_len, kv_lens, n_tokens, block_q)
    qb = pack_query_blocks(q, blocks, n_kv, padded_group, block_q)  # [Qb, K, M, H]
    n_blocks = qb.shape[0]
    # A row's last tile may cover table entries past its pages, which may hold anything:
    # clamp them into the pool (what they point at is masked) and pad to whole tiles.
    table = jnp.clip(page_indices.astype(jnp.int32), 0, n_pages - 1)  # [R, Pr]
    table = jnp.pad(table, ((0, 0), (0, -table.shape[1] % (block_k // page_size))))

    kernel = functools.partial(
        _paged_kernel,
        scale=scale,
        group_shift=padded_group.bit_length() - 1,
        block_k=block_k,
        pages_per_row=table.shape[1],
    )
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, *_: (b, h, 0, 0))
    pool_spec = pl.BlockSpec(memory_space=pl.ANY)
    buffer = pltpu.VMEM((2, block_k, head_dim), k_pages.dtype)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(n_blocks, n_kv),
            in_specs=[tile_spec, pool_spec, pool_spec],
            out_specs=tile_spec,
            scratch_shapes=[buffer, buffer, pltpu.SemaphoreType.DMA((2, 2))],
        ),
        out_shape=jax.ShapeDtypeStruct((n_blocks, n_kv, rows, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tpu_ragged_paged_attention",
    )(blocks.start, blocks.count, blocks.row, table.reshape(-1), qb, k_pages, v_pages)
    return unpack_query_blocks(out, blocks, cu, n_tokens, n_heads, block_q)
