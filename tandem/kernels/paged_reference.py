"""Attention over a paged KV cache, in pure JAX: the specification, the write side, and
the blocked variant that runs on CPU.

Layout (per layer; see docs/kernels.md):
  k_pages, v_pages  [K, P, Ps, H]   a pool of P pages of Ps tokens, kv-head major, so one
                                    (kv head, page) is a contiguous [Ps, H] tile
  page_indices      [R, Pr]         row r's page table: its token s sits in page
                                    page_indices[r, s // Ps] at offset s % Ps
One engine step is a ragged batch of R rows (a decode row has 1 query token, a prompt
chunk several) whose T query tokens are packed row after row:
  q                 [T, N, H]       row r's queries are q[cu_q_lens[r]:cu_q_lens[r + 1]]
  kv_lens           [R]             tokens of row r's sequence in the cache, this step's
                                    included (their K/V are written before attention)
  num_rows          []              rows in use; rows >= num_rows and tokens >=
                                    cu_q_lens[num_rows] are padding and get zeros
Query j of row r (q_len = cu_q_lens[r + 1] - cu_q_lens[r]) sits at position
kv_lens[r] - q_len + j and attends causally to cache positions 0 .. that position. This
is the argument list of jax's TPU `ragged_paged_attention` and vLLM's attention metadata
(`seq_lens`, `block_table`, `query_start_loc`); the pool is laid out as jax's GPU and TPU
`paged_attention` lay it out (its TPU `ragged_paged_attention` interleaves K and V heads
instead: tpu_paged_attention.py says why tandem does not).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row gives zeros instead of NaN


def write_pages(
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,  # [K, P, Ps, H]
    k: jax.Array,  # [T, K, H]  this step's new keys
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32: page * Ps + offset; -1 = padding, not written
) -> tuple[jax.Array, jax.Array]:  # the pools with the new entries
    """Scatters the step's new K/V into their cache slots (vLLM's `slot_mapping`).

    Under `jax.jit` with the pools donated this is an in-place update: the [K, P, Ps, H]
    <-> [K, P * Ps, H] reshapes are bitcasts and the scatter writes T rows per kv head.
    """
    n_kv, pages, page_size, head_dim = k_pages.shape
    capacity = pages * page_size
    # -1 must not wrap around to the last slot: send it out of bounds, where mode="drop"
    # drops it.
    slots = jnp.where(slot_mapping >= 0, slot_mapping, capacity)  # [T]

    def scatter(pool: jax.Array, new: jax.Array) -> jax.Array:
        flat = pool.reshape(n_kv, capacity, head_dim)  # [K, P * Ps, H]
        flat = flat.at[:, slots].set(new.swapaxes(0, 1).astype(pool.dtype), mode="drop")
        return flat.reshape(n_kv, pages, page_size, head_dim)

    return scatter(k_pages, k), scatter(v_pages, v)


def check_row_arrays(
    kv_lens: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array, num_rows: jax.Array
) -> None:
    """ValueError unless the per-row arrays of a ragged step agree in shape ([R], [R, Pr],
    [R + 1], a scalar): what the kernels check before they build their blocks."""
    n_rows = kv_lens.shape[0] if kv_lens.ndim == 1 else -1
    if page_indices.ndim != 2 or page_indices.shape[0] != n_rows:
        raise ValueError(
            f"page_indices has shape {page_indices.shape}, expected [R, Pr] with "
            f"R = len(kv_lens) = {n_rows}"
        )
    if cu_q_lens.shape != (n_rows + 1,):
        raise ValueError(f"cu_q_lens has shape {cu_q_lens.shape}, expected [R + 1]=({n_rows + 1},)")
    if num_rows.shape != ():
        raise ValueError(f"num_rows has shape {num_rows.shape}, expected a scalar")


class QueryBlocks(NamedTuple):
    """The step's query tokens cut into blocks of `block_q` tokens of one row each (the
    unit of work of the Pallas kernel and of the CPU chunk loop). Per block, padded to
    the static bound T // block_q + min(R, T); blocks past the real ones have count 0."""

    row: jax.Array  # [Qb] its row
    first_token: jax.Array  # [Qb] index in q of its first token
    start: jax.Array  # [Qb] cache position of its first token
    count: jax.Array  # [Qb] real tokens in it (0 .. block_q)
    first_block: jax.Array  # [R] each row's first block
    total: jax.Array  # [] blocks in use


def step_rows(
    cu_q_lens: jax.Array,  # [R + 1] int32
    num_rows: jax.Array,  # [] int32
) -> tuple[jax.Array, jax.Array]:  # [R + 1] row starts, [R] query tokens per row
    """cu_q_lens with the entries past num_rows (which may hold anything) replaced by the
    end of the last real row, and each row's query count (0 for padding rows)."""
    n_rows = cu_q_lens.shape[0] - 1
    cu = jnp.where(jnp.arange(n_rows + 1) <= num_rows, cu_q_lens, cu_q_lens[num_rows])
    return cu, cu[1:] - cu[:-1]


def query_rows(
    cu: jax.Array,  # [R + 1] int32: row starts from `step_rows`
    n_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # [T] row, [T] index within it, [T] real
    """Each query token's row, its index within the row, and whether it is a real token."""
    n_rows = cu.shape[0] - 1
    tokens = jnp.arange(n_tokens, dtype=jnp.int32)  # [T]
    row = jnp.searchsorted(cu[1:], tokens, side="right").astype(jnp.int32)  # [T]
    row = jnp.minimum(row, n_rows - 1)
    return row, tokens - cu[row], tokens < cu[n_rows]


def query_blocks(
    cu: jax.Array,  # [R + 1] int32: row starts from `step_rows`
    q_len: jax.Array,  # [R] int32: query tokens per row (0: the row gets no block)
    kv_lens: jax.Array,  # [R] int32
    n_tokens: int,
    block_q: int,
) -> QueryBlocks:
    """Cuts each row's queries into blocks of block_q tokens, in row order."""
    n_rows = q_len.shape[0]
    n_blocks = -(-q_len // block_q)  # [R]
    blocks_end = jnp.cumsum(n_blocks)  # [R]
    first_block = blocks_end - n_blocks  # [R]
    # sum ceil(q_len / block_q) <= T // block_q + (rows with a query) <= that + min(R, T)
    capacity = n_tokens // block_q + min(n_rows, n_tokens)
    block = jnp.arange(capacity, dtype=jnp.int32)  # [Qb]
    row = jnp.searchsorted(blocks_end, block, side="right").astype(jnp.int32)
    row = jnp.minimum(row, n_rows - 1)  # [Qb]; blocks past the last are empty
    first = (block - first_block[row]) * block_q  # [Qb] index of its first token in the row
    count = jnp.clip(q_len[row] - first, 0, block_q)  # [Qb]
    start = kv_lens[row] - q_len[row] + first  # [Qb]
    return QueryBlocks(row, cu[row] + first, start, count, first_block, blocks_end[-1])


def pack_query_blocks(
    q: jax.Array,  # [T, N, H]
    blocks: QueryBlocks,
    n_kv: int,
    padded_group: int,
    block_q: int,
) -> jax.Array:  # [Qb, K, M, H], M = block_q * padded_group
    """Each block's query tile per kv head, the unit the paged kernels compute: row m is
    token m // Gp of the block and query head m % Gp of the kv head's group (heads padded
    with zeros from G to Gp), so one K/V tile serves every query of the group."""
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // n_kv
    n_blocks = blocks.row.shape[0]
    tokens = blocks.first_token[:, None] + jnp.arange(block_q)  # [Qb, Bq]
    tokens = jnp.minimum(tokens, n_tokens - 1)
    qb = q[tokens].reshape(n_blocks, block_q, n_kv, group, head_dim)  # [Qb, Bq, K, G, H]
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    return qb.transpose(0, 2, 1, 3, 4).reshape(n_blocks, n_kv, block_q * padded_group, head_dim)


def unpack_query_blocks(
    out: jax.Array,  # [Qb, K, M, H] the kernel's tiles
    blocks: QueryBlocks,
    cu: jax.Array,  # [R + 1] int32: row starts from `step_rows`
    n_tokens: int,
    n_heads: int,
    block_q: int,
) -> jax.Array:  # [T, N, H]
    """`pack_query_blocks` undone: the tiles back to [T, N, H] by one gather, with zeros
    for the padding tokens."""
    n_blocks, n_kv, rows, head_dim = out.shape
    padded_group, group = rows // block_q, n_heads // n_kv
    out = out.reshape(n_blocks, n_kv, block_q, padded_group, head_dim)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(n_blocks, block_q, n_heads, head_dim)
    token_row, index, real = query_rows(cu, n_tokens)  # [T] each
    out = out[blocks.first_block[token_row] + index // block_q, index % block_q]  # [T, N, H]
    return jnp.where(real[:, None, None], out, jnp.zeros_like(out))


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,  # [K, P, Ps, H]
    kv_lens: jax.Array,  # [R] int32
    page_indices: jax.Array,  # [R, Pr] int32
    cu_q_lens: jax.Array,  # [R + 1] int32
    num_rows: jax.Array,  # [] int32
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]
    """The specification: every query token gathers its row's whole page table.

    Plain and obviously right, and memory-hungry ([T, K, Pr * Ps, H] keys): what tests
    compare against. `ragged_paged_attention_blocked` computes the same on CPU.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv, _, page_size, _ = k_pages.shape
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    cu, q_len = step_rows(cu_q_lens, num_rows)
    row, index, real = query_rows(cu, n_tokens)  # [T] each
    position = kv_lens[row] - q_len[row] + index  # [T]
    pages = page_indices[row]  # [T, Pr]
    max_len = pages.shape[1] * page_size

    def gather(pool: jax.Array) -> jax.Array:  # [T, K, Pr * Ps, H]
        return pool[:, pages].reshape(n_kv, n_tokens, max_len, head_dim).swapaxes(0, 1)

    k, v = gather(k_pages), gather(v_pages)
    qg = q.reshape(n_tokens, n_kv, n_heads // n_kv, head_dim)  # [T, K, G, H]
    logits = jnp.einsum("tkgh,tksh->tkgs", qg, k, preferred_element_type=jnp.float32)
    visible = jnp.arange(max_len)[None, :] <= position[:, None]  # [T, S]
    logits = jnp.where(visible[:, None, None, :], logits * scale, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    v = jnp.where(visible[:, None, :, None], v, 0)  # unseen slots may hold NaN: 0 * NaN = NaN
    out = jnp.einsum(
        "tkgs,tksh->tkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # [T, K, G, H]
    out = jnp.where(real[:, None, None, None], out, 0.0)
    return out.reshape(n_tokens, n_heads, head_dim).astype(q.dtype)
