"""Attention in XLA whose work follows the live lengths: what runs where no Pallas kernel
does (CPU always; TPU and GPU shapes a kernel cannot take).

The reference (paged_reference.py) gathers every query's whole page table, while
sequences are usually far shorter and of very different lengths. This variant computes
the same thing over page prefixes chosen on device with `lax.switch` over fixed sizes
(buckets), so no shape depends on data and the reads follow the live lengths, not the
capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.kernels.paged_reference import query_blocks, step_rows
from tandem.kernels.reference import decode_attention_reference

_MASKED = -1e30  # finite, as in the references

_MIN_BUCKET_LEN = 64


def per_slot_length_buckets(max_len: int) -> tuple[int, ...]:
    """Prefix lengths a sequence may read: multiples of 64 up to 512, then four per
    octave, then S (at most 25 % more than a sequence needs past 512; 24 branches for
    S = 8192)."""
    sizes = []
    size, step = _MIN_BUCKET_LEN, _MIN_BUCKET_LEN
    while size < max_len:
        sizes.append(size)
        if size >= 8 * step:
            step *= 2
        size += step
    return (*sizes, max_len)


def bucket_index(sizes: tuple[int, ...], need: jax.Array) -> jax.Array:
    """Index of the first size >= need (the last one if none is)."""
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need)
    return jnp.minimum(index, len(sizes) - 1)


# Paged attention on CPU: two loops, each iteration reading only the pages its queries
# can see (a page-count bucket of per_slot_length_buckets) and gathering them by index:
#   * decode rows (one query token) in groups of DECODE_GROUP rows, each group reading
#     the prefix of its longest row: an iteration has a fixed cost on CPU whatever it
#     reads, so one row per iteration paid it four times as often, while one prefix for
#     the whole batch made every short row read the longest one's length (measured:
#     docs/benchmarks.md, "Measurements behind code choices");
#   * the other rows' queries in blocks of CHUNK_BLOCK tokens (`query_blocks`), each
#     block reading up to its last query's position (causality: a chunk's early blocks
#     read less); a block is two batched GEMMs over the kv heads (blocks of 64 in that
#     form measured 1.5x faster than blocks of 32 per (kv head, group member) with
#     context past 1,000 tokens: docs/benchmarks.md, "Measurements behind code choices").
# The trip counts are the live decode groups and chunk blocks, so padding rows and
# tokens cost nothing. The plain reference instead gathers every query's whole page table.
DECODE_GROUP = 4
CHUNK_BLOCK = 64


def page_buckets(pages_per_seq: int, page_size: int) -> tuple[int, ...]:
    """Page counts to read: per_slot_length_buckets in whole pages, up to the table."""
    sizes = per_slot_length_buckets(pages_per_seq * page_size)
    return tuple(sorted({-(-size // page_size) for size in sizes}))


def ragged_paged_attention_blocked(
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
    """`ragged_paged_attention_reference`, reading only the pages each query can see."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv, _, page_size, _ = k_pages.shape
    n_rows, pages_per_seq = page_indices.shape
    group = n_heads // n_kv
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    sizes = page_buckets(pages_per_seq, page_size)
    cu, q_len = step_rows(cu_q_lens, num_rows)
    # Rows past T are where padding entries of a group or block write; sliced off below.
    out = jnp.zeros((n_tokens + CHUNK_BLOCK, n_heads, head_dim), q.dtype)
    q_padded = jnp.concatenate([q, jnp.zeros_like(out[n_tokens:])])

    def read(pool: jax.Array, pages: jax.Array) -> jax.Array:  # [..., n] -> [K, ..., n * Ps, H]
        gathered = pool[:, pages]  # [K, ..., n, Ps, H]
        return gathered.reshape(*gathered.shape[:-3], -1, head_dim)

    # -- decode rows, DECODE_GROUP per iteration --
    is_decode = q_len == 1  # [R]
    # Decode rows first, shortest first, so each group of DECODE_GROUP rows holds similar
    # lengths and its page bucket (its longest row) wastes little on the others.
    key = jnp.where(is_decode, kv_lens, jnp.iinfo(jnp.int32).max)  # [R]
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    n_groups = -(-n_rows // DECODE_GROUP)
    order = jnp.pad(order, (0, n_groups * DECODE_GROUP - n_rows))  # [Rg]
    in_use = jnp.arange(order.shape[0]) < jnp.sum(is_decode)  # [Rg]
    target = jnp.where(in_use, cu[order], n_tokens)  # [Rg] the token each entry is
    length = jnp.where(in_use, kv_lens[order], 0)  # [Rg]
    longest = length.reshape(n_groups, DECODE_GROUP).max(axis=1)  # [Rg / g]
    decode_bucket = bucket_index(sizes, -(-longest // page_size))
    # Per-row gathers once, outside the loop: an iteration only slices them.
    decode_q = q_padded[target]  # [Rg, N, H]
    decode_pages = page_indices[order]  # [Rg, Pr]

    def decode_branch(n_pages: int):
        def attend(first):
            query = jax.lax.dynamic_slice_in_dim(decode_q, first, DECODE_GROUP)  # [g, N, H]
            pages = jax.lax.dynamic_slice(decode_pages, (first, 0), (DECODE_GROUP, n_pages))
            # [K, g, S, H] -> [g, K, S, H]: XLA's CPU dots run about twice as fast on
            # the [rows, K, S, H] layout as on the gathered one.
            k = read(k_pages, pages).swapaxes(0, 1)
            v = read(v_pages, pages).swapaxes(0, 1)
            lengths = jax.lax.dynamic_slice_in_dim(length, first, DECODE_GROUP)  # [g]
            return decode_attention_reference(query, k, v, lengths, scale=scale)

        return attend

    decode_branches = [decode_branch(n) for n in sizes]

    def decode_group(i, decode_out):
        first = i * DECODE_GROUP
        res = jax.lax.switch(decode_bucket[i], decode_branches, first)  # [g, N, H]
        return jax.lax.dynamic_update_slice_in_dim(decode_out, res, first, 0)

    live_groups = -(-jnp.sum(is_decode) // DECODE_GROUP)
    decode_out = jax.lax.fori_loop(0, live_groups, decode_group, jnp.zeros_like(decode_q))
    out = out.at[target].set(decode_out)  # entries not in use land past T

    # -- the other rows, CHUNK_BLOCK query tokens per iteration --
    blocks = query_blocks(cu, jnp.where(is_decode, 0, q_len), kv_lens, n_tokens, CHUNK_BLOCK)
    chunk_bucket = bucket_index(sizes, -(-(blocks.start + blocks.count) // page_size))
    offsets = jnp.arange(CHUNK_BLOCK)
    # position of each query row m = (token, group member) of each block: [blocks, M]
    query_position = jnp.repeat(blocks.start[:, None] + offsets, group, axis=1)

    def chunk_branch(n_pages: int):
        def attend(b):
            query = jax.lax.dynamic_slice_in_dim(q_padded, blocks.first_token[b], CHUNK_BLOCK)
            pages = jax.lax.dynamic_slice(page_indices, (blocks.row[b], 0), (1, n_pages))[0]
            # in float32: XLA's CPU dot has no bf16 x bf16 -> f32 for these batched
            # shapes (UNIMPLEMENTED at run time), and a CPU has no bf16 matmul to lose
            k = read(k_pages, pages).astype(jnp.float32)  # [K, S, H]
            v = read(v_pages, pages).astype(jnp.float32)
            # A block's queries of one kv head are the rows of one matrix, M = Bq * G
            # (query-major): two batched GEMMs over K, no transpose of the pages.
            qg = query.reshape(CHUNK_BLOCK, n_kv, group, head_dim).swapaxes(0, 1)
            qm = qg.reshape(n_kv, CHUNK_BLOCK * group, head_dim).astype(jnp.float32)
            logits = jnp.einsum("kmh,ksh->kms", qm * scale, k)  # [K, M, S]
            seen = jnp.arange(k.shape[1])[None, :] <= query_position[b][:, None]  # [M, S]
            probs = jax.nn.softmax(jnp.where(seen, logits, _MASKED), axis=-1)
            res = jnp.einsum("kms,ksh->kmh", probs, v)  # [K, M, H]
            res = res.reshape(n_kv, CHUNK_BLOCK, group, head_dim).swapaxes(0, 1)
            return res.reshape(CHUNK_BLOCK, n_heads, head_dim).astype(q.dtype)

        return attend

    chunk_branches = [chunk_branch(n) for n in sizes]

    def chunk_block(b, out):
        res = jax.lax.switch(chunk_bucket[b], chunk_branches, b)  # [Bq, N, H]
        first = blocks.first_token[b]
        kept = jax.lax.dynamic_slice_in_dim(out, first, CHUNK_BLOCK)  # the next row's
        res = jnp.where((offsets < blocks.count[b])[:, None, None], res, kept)
        return jax.lax.dynamic_update_slice_in_dim(out, res, first, 0)

    out = jax.lax.fori_loop(0, blocks.total, chunk_block, out)
    return out[:n_tokens]
