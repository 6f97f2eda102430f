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

from tandem.kernels import cpu_decode_attention
from tandem.kernels.paged_reference import query_blocks, step_rows

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
#   * the other rows' queries in blocks of `chunk_blocks(T)` tokens (`query_blocks`), each
#     block reading up to its last query's position (causality: a chunk's early blocks
#     read less); a block is two batched GEMMs over the kv heads (blocks of 64 in that
#     form measured 1.5x faster than blocks of 32 per (kv head, group member) with
#     context past 1,000 tokens: docs/benchmarks.md, "Measurements behind code choices").
# The trip counts are the live decode groups and chunk blocks, so padding rows and
# tokens cost nothing. The plain reference instead gathers every query's whole page table.
# With `native_decode` (the dispatcher's choice on CPU) the decode rows go to the C++
# kernel of cpu_decode_attention.py instead, which reads pages without gathering them.
DECODE_GROUP = 4
PREFIX_ROWS = 16  # decode rows per GEMM over their common prefix
PREFIX_TOKENS = 256  # common-prefix positions per iteration of its loop (its granularity)
CHUNK_BLOCK = 64
SMALL_STEP_CHUNK_BLOCK = 16


def chunk_blocks(n_tokens: int) -> tuple[int, int]:
    """Query tokens per chunk block in a step of n_tokens, as (small, large): a step
    whose chunks each fit one block of `small` runs blocks of `small`, any other step
    blocks of `large` (the two are equal past 32 tokens). One block per chunk is what
    pays on CPU: each block gathers the pages its queries see, which costs more than the
    queries it spares (a 20-token chunk at position 1,000 in two blocks of 16 took 1.3x
    one block of 64), so `large` holds the whole step, up to CHUNK_BLOCK. A step of at
    most 32 tokens whose chunks fit SMALL_STEP_CHUNK_BLOCK (a budget of 32 set for the
    streams' gaps leaves 16 tokens beside 16 decodes) computes half the queries with it
    (docs/benchmarks.md, "Measurements behind code choices")."""
    large = min(n_tokens, CHUNK_BLOCK)
    if n_tokens <= 2 * SMALL_STEP_CHUNK_BLOCK:
        return min(large, SMALL_STEP_CHUNK_BLOCK), large
    return large, large


def page_buckets(pages_per_seq: int, page_size: int) -> tuple[int, ...]:
    """Page counts to read: per_slot_length_buckets in whole pages, up to the table."""
    sizes = per_slot_length_buckets(pages_per_seq * page_size)
    return tuple(sorted({-(-size // page_size) for size in sizes}))


def common_prefix_pages(
    page_indices: jax.Array,  # [R, Pr] int32
    kv_lens: jax.Array,  # [R] int32
    is_decode: jax.Array,  # [R] bool
    page_size: int,
) -> jax.Array:  # [] int32
    """How many leading page-table columns hold the same page in every decode row, all of
    it before each row's new token (0 with fewer than two decode rows): the pages the
    decode rows can read once for all of them. Prefix caching makes them common (a shared
    system prompt, n choices of one prompt); as a page's id is its content, equal ids are
    enough."""
    n_cols = page_indices.shape[1]
    first = jnp.argmax(is_decode)
    same = jnp.all((page_indices == page_indices[first]) | ~is_decode[:, None], axis=0)  # [Pr]
    run = jnp.sum(jnp.cumprod(same.astype(jnp.int32)))
    full = jnp.min(jnp.where(is_decode, (kv_lens - 1) // page_size, n_cols))
    return jnp.where(jnp.sum(is_decode) >= 2, jnp.minimum(run, full), 0).astype(jnp.int32)


def _attend(logits: jax.Array, v: jax.Array, spec: str) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis of `logits`, then `einsum(spec, probs, v)`: the
    normalized output (float32) and each query's log-sum-exp, for `_merge`."""
    top = logits.max(axis=-1, keepdims=True)
    probs = jnp.exp(logits - top)
    total = probs.sum(axis=-1, keepdims=True)
    out = jnp.einsum(spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / total, (top + jnp.log(total))[..., 0]


def _merge(
    out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
) -> jax.Array:  # [..., N, H]
    """Attention over two disjoint sets of positions, combined into attention over both."""
    top = jnp.maximum(lse_a, lse_b)
    weight_a, weight_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)  # [..., N]
    both = out_a * weight_a[..., None] + out_b * weight_b[..., None]
    return both / (weight_a + weight_b)[..., None]


def _read(pool: jax.Array, pages: jax.Array) -> jax.Array:  # [..., n] -> [K, ..., n * Ps, H]
    """The pages' positions of every kv head, gathered (copied) in table order."""
    gathered = pool[:, pages]  # [K, ..., n, Ps, H]
    return gathered.reshape(*gathered.shape[:-3], -1, pool.shape[-1])


def _decode_groups(
    decode_q: jax.Array,  # [Rg, N, H] decode rows, shortest first
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,
    decode_pages: jax.Array,  # [Rg, Pr + extra] their page tables
    own: jax.Array,  # [Rg] positions past the common prefix (0: entry not in use)
    common: jax.Array,  # [] the common prefix's pages, which `own` starts after
    prefix_out: jax.Array,  # [Rg, N, H] attention over the common prefix
    prefix_lse: jax.Array,  # [Rg, N]
    n_decode: jax.Array,  # [] decode rows in use
    sizes: tuple[int, ...],  # page-count buckets
    scale: float,
) -> jax.Array:  # [Rg, N, H]
    """The decode rows in XLA: DECODE_GROUP rows per iteration, each group reading its
    longest row's page bucket past the common prefix, merged with the prefix's part."""
    _, n_heads, head_dim = decode_q.shape
    n_kv, _, page_size, _ = k_pages.shape
    group = n_heads // n_kv
    longest = own.reshape(-1, DECODE_GROUP).max(axis=1)  # [Rg / g]
    decode_bucket = bucket_index(sizes, -(-longest // page_size))

    def decode_branch(n_pages: int):
        def attend(first):
            query = jax.lax.dynamic_slice_in_dim(decode_q, first, DECODE_GROUP)  # [g, N, H]
            pages = jax.lax.dynamic_slice(decode_pages, (first, common), (DECODE_GROUP, n_pages))
            # [K, g, S, H] -> [g, K, S, H]: XLA's CPU dots run about twice as fast on
            # the [rows, K, S, H] layout as on the gathered one.
            k = _read(k_pages, pages).swapaxes(0, 1)
            v = _read(v_pages, pages).swapaxes(0, 1)
            lengths = jax.lax.dynamic_slice_in_dim(own, first, DECODE_GROUP)  # [g]
            qg = query.reshape(DECODE_GROUP, n_kv, group, head_dim)  # [g, K, G, H]
            logits = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32)
            valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [g, S]
            logits = jnp.where(valid[:, None, None, :], logits * scale, _MASKED)
            v = jnp.where(valid[:, None, :, None], v, 0)  # a freed page's NaN: 0 * NaN = NaN
            res, lse = _attend(logits, v, "bkgs,bksh->bkgh")  # [g, K, G, H], [g, K, G]
            prefix = jax.lax.dynamic_slice_in_dim(prefix_out, first, DECODE_GROUP)
            prefix_lse_ = jax.lax.dynamic_slice_in_dim(prefix_lse, first, DECODE_GROUP)
            res = res.reshape(DECODE_GROUP, n_heads, head_dim)
            lse = lse.reshape(DECODE_GROUP, n_heads)
            return _merge(prefix, prefix_lse_, res, lse).astype(decode_q.dtype)

        return attend

    decode_branches = [decode_branch(n) for n in sizes]

    def decode_group(i, decode_out):
        first = i * DECODE_GROUP
        res = jax.lax.switch(decode_bucket[i], decode_branches, first)  # [g, N, H]
        return jax.lax.dynamic_update_slice_in_dim(decode_out, res, first, 0)

    live_groups = -(-n_decode // DECODE_GROUP)
    return jax.lax.fori_loop(0, live_groups, decode_group, jnp.zeros_like(decode_q))


def _decode_rows(
    q_padded: jax.Array,  # [T + CHUNK_BLOCK, N, H] the step's queries, zeros past T
    target: jax.Array,  # [R] each decode row's token, T for the other rows
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,
    page_indices: jax.Array,  # [R, Pr]
    lengths: jax.Array,  # [R] each decode row's positions, 0 for the other rows
    sizes: tuple[int, ...],  # page-count buckets
    scale: float,
) -> tuple[jax.Array, jax.Array]:  # [Rg] the token of each output row, [Rg, N, H]
    """The decode rows in XLA: the pages all of them share (`common_prefix_pages`), in
    whole slices of PREFIX_TOKENS positions, attended once for all of them, then
    `_decode_groups` over the rest."""
    n_tokens = q_padded.shape[0] - CHUNK_BLOCK
    n_rows = lengths.shape[0]
    n_kv, _, page_size, _ = k_pages.shape
    n_decode = jnp.sum(lengths > 0)
    # Decode rows first, shortest first, so each group of DECODE_GROUP rows holds similar
    # lengths and its page bucket (its longest row) wastes little on the others.
    key = jnp.where(lengths > 0, lengths, jnp.iinfo(jnp.int32).max)  # [R]
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    n_entries = -(-n_rows // PREFIX_ROWS) * PREFIX_ROWS
    order = jnp.pad(order, (0, n_entries - n_rows))  # [Rg]
    in_use = jnp.arange(n_entries) < n_decode  # [Rg]
    target = jnp.where(in_use, target[order], n_tokens)  # [Rg] the token each entry is
    decode_q = q_padded[target]  # [Rg, N, H]
    lengths = jnp.where(in_use, lengths[order], 0)  # [Rg]
    tables = page_indices[order]  # [Rg, Pr]
    _, n_heads, head_dim = decode_q.shape
    group = n_heads // n_kv
    # The common prefix in whole slices of PREFIX_TOKENS positions (its loop's unit; the
    # rest of it each row reads as its own pages): [] pages, [] positions.
    slice_pages = max(1, PREFIX_TOKENS // page_size)
    common = common_prefix_pages(tables, lengths, lengths > 0, page_size)
    common = common // slice_pages * slice_pages
    own = jnp.where(lengths > 0, lengths - common * page_size, 0)  # [Rg] past the prefix
    # The tables get more columns, so a slice from column `common` (or a prefix slice)
    # stays in range.
    extra = max(sizes[-1], PREFIX_TOKENS // page_size)
    decode_pages = jnp.pad(tables, ((0, 0), (0, extra)))  # [Rg, Pr + extra]

    # The common prefix: an online softmax over its slices (one loop body, not a branch
    # per page bucket: each branch is compile time), each slice gathered once and attended
    # by PREFIX_ROWS decode rows' queries at a time as one [M, H] matrix per kv head.
    # Carried per (kv head, decode row x group member).
    rows_m = PREFIX_ROWS * group
    prefix_q = decode_q.reshape(n_entries, n_kv, group, head_dim).swapaxes(0, 1)
    prefix_q = prefix_q.reshape(n_kv, n_entries * group, head_dim).astype(jnp.float32) * scale

    def prefix_slice(c, carry):
        pages = jax.lax.dynamic_slice_in_dim(decode_pages[0], c * slice_pages, slice_pages)
        k = _read(k_pages, pages).astype(jnp.float32)  # [K, S, H]: every row's pages
        v = _read(v_pages, pages).astype(jnp.float32)

        def rows(i, carry):
            acc, top, total = carry  # [K, Rg * G, H], [K, Rg * G], [K, Rg * G]
            first = i * rows_m
            query = jax.lax.dynamic_slice_in_dim(prefix_q, first, rows_m, axis=1)
            logits = jnp.einsum("kmh,ksh->kms", query, k)  # [K, M, S], all of it shared
            old_top = jax.lax.dynamic_slice_in_dim(top, first, rows_m, axis=1)
            new_top = jnp.maximum(old_top, logits.max(axis=-1))  # [K, M]
            probs = jnp.exp(logits - new_top[..., None])
            decay = jnp.exp(old_top - new_top)
            old_total = jax.lax.dynamic_slice_in_dim(total, first, rows_m, axis=1)
            old_acc = jax.lax.dynamic_slice_in_dim(acc, first, rows_m, axis=1)
            new_acc = old_acc * decay[..., None] + jnp.einsum("kms,ksh->kmh", probs, v)
            return (
                jax.lax.dynamic_update_slice_in_dim(acc, new_acc, first, 1),
                jax.lax.dynamic_update_slice_in_dim(top, new_top, first, 1),
                jax.lax.dynamic_update_slice_in_dim(
                    total, old_total * decay + probs.sum(axis=-1), first, 1
                ),
            )

        return jax.lax.fori_loop(0, -(-n_decode // PREFIX_ROWS), rows, carry)

    acc, top, total = jax.lax.fori_loop(
        0,
        common // slice_pages,  # 0 when the decode rows share less than a slice
        prefix_slice,
        (
            jnp.zeros(prefix_q.shape, jnp.float32),
            jnp.full(prefix_q.shape[:2], _MASKED, jnp.float32),
            jnp.zeros(prefix_q.shape[:2], jnp.float32),
        ),
    )
    attended = total > 0  # [K, Rg * G]; else no position: a weight of 0 in `_merge`
    prefix_out = jnp.where(attended[..., None], acc / jnp.where(attended, total, 1)[..., None], 0)
    prefix_lse = jnp.where(attended, top + jnp.log(jnp.where(attended, total, 1)), _MASKED)
    prefix_out = prefix_out.reshape(n_kv, n_entries, group, head_dim).swapaxes(0, 1)
    prefix_out = prefix_out.reshape(n_entries, n_heads, head_dim)  # [Rg, N, H]
    prefix_lse = prefix_lse.reshape(n_kv, n_entries, group).swapaxes(0, 1)
    prefix_lse = prefix_lse.reshape(n_entries, n_heads)  # [Rg, N]

    return target, _decode_groups(
        decode_q, k_pages, v_pages, decode_pages, own, common,
        prefix_out, prefix_lse, n_decode, sizes, scale,
    )  # fmt: skip


def _chunk_rows(
    out: jax.Array,  # [T + CHUNK_BLOCK, N, H] the decode rows' outputs in place
    q_padded: jax.Array,  # [T + CHUNK_BLOCK, N, H] the step's queries, zeros past T
    k_pages: jax.Array,  # [K, P, Ps, H]
    v_pages: jax.Array,
    kv_lens: jax.Array,  # [R]
    page_indices: jax.Array,  # [R, Pr]
    cu: jax.Array,  # [R + 1] row starts from `step_rows`
    chunk_len: jax.Array,  # [R] each row's query tokens, 0 for decode and padding rows
    sizes: tuple[int, ...],  # page-count buckets
    scale: float,
    block_q: int,
    enabled: jax.Array,  # [] bool: False runs no block
) -> jax.Array:  # [T + CHUNK_BLOCK, N, H] with the chunks' outputs
    """The rows with more than one query token (prompt chunks), block_q query tokens per
    iteration, each block reading its last query's page bucket."""
    n_tokens = q_padded.shape[0] - CHUNK_BLOCK
    _, n_heads, head_dim = q_padded.shape
    n_kv, _, page_size, _ = k_pages.shape
    group = n_heads // n_kv
    blocks = query_blocks(cu, chunk_len, kv_lens, n_tokens, block_q)
    chunk_bucket = bucket_index(sizes, -(-(blocks.start + blocks.count) // page_size))
    offsets = jnp.arange(block_q)
    # position of each query row m = (token, group member) of each block: [blocks, M]
    query_position = jnp.repeat(blocks.start[:, None] + offsets, group, axis=1)

    def chunk_branch(n_pages: int):
        def attend(b):
            query = jax.lax.dynamic_slice_in_dim(q_padded, blocks.first_token[b], block_q)
            pages = jax.lax.dynamic_slice(page_indices, (blocks.row[b], 0), (1, n_pages))[0]
            # in float32: XLA's CPU dot has no bf16 x bf16 -> f32 for these batched
            # shapes (UNIMPLEMENTED at run time), and a CPU has no bf16 matmul to lose
            k = _read(k_pages, pages).astype(jnp.float32)  # [K, S, H]
            v = _read(v_pages, pages).astype(jnp.float32)
            # A block's queries of one kv head are the rows of one matrix, M = Bq * G
            # (query-major): two batched GEMMs over K, no transpose of the pages.
            qg = query.reshape(block_q, n_kv, group, head_dim).swapaxes(0, 1)
            qm = qg.reshape(n_kv, block_q * group, head_dim).astype(jnp.float32)
            logits = jnp.einsum("kmh,ksh->kms", qm * scale, k)  # [K, M, S]
            seen = jnp.arange(k.shape[1])[None, :] <= query_position[b][:, None]  # [M, S]
            probs = jax.nn.softmax(jnp.where(seen, logits, _MASKED), axis=-1)
            written = jnp.arange(k.shape[1]) < blocks.start[b] + blocks.count[b]  # [S]
            v = jnp.where(written[None, :, None], v, 0)  # (as in decode_branch)
            res = jnp.einsum("kms,ksh->kmh", probs, v)  # [K, M, H]
            res = res.reshape(n_kv, block_q, group, head_dim).swapaxes(0, 1)
            return res.reshape(block_q, n_heads, head_dim).astype(q_padded.dtype)

        return attend

    chunk_branches = [chunk_branch(n) for n in sizes]

    def attend_block(b, out):
        res = jax.lax.switch(chunk_bucket[b], chunk_branches, b)  # [Bq, N, H]
        first = blocks.first_token[b]
        kept = jax.lax.dynamic_slice_in_dim(out, first, block_q)  # the next row's
        res = jnp.where((offsets < blocks.count[b])[:, None, None], res, kept)
        return jax.lax.dynamic_update_slice_in_dim(out, res, first, 0)

    return jax.lax.fori_loop(0, jnp.where(enabled, blocks.total, 0), attend_block, out)


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
    native_decode: bool = False,
) -> jax.Array:  # [T, N, H]
    """`ragged_paged_attention_reference`, reading only the pages each query can see.

    native_decode: the decode rows through the C++ kernel (cpu_decode_attention.py;
    float32 pools, when `available()`) instead of XLA's `_decode_rows`."""
    n_tokens, n_heads, head_dim = q.shape
    page_size = k_pages.shape[2]
    pages_per_seq = page_indices.shape[1]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    sizes = page_buckets(pages_per_seq, page_size)
    cu, q_len = step_rows(cu_q_lens, num_rows)
    # Rows past T are where padding entries of a group or block write; sliced off below.
    out = jnp.zeros((n_tokens + CHUNK_BLOCK, n_heads, head_dim), q.dtype)
    q_padded = jnp.concatenate([q, jnp.zeros_like(out[n_tokens:])])

    # -- decode rows --
    is_decode = q_len == 1  # [R]
    target = jnp.where(is_decode, cu[:-1], n_tokens)  # [R] each decode row's token, or past T
    lengths = jnp.where(is_decode, kv_lens, 0)  # [R] positions each decode row attends to
    if native_decode:
        decode_out = cpu_decode_attention.paged_decode_attention(
            q_padded[target], k_pages, v_pages, page_indices, lengths, sm_scale=scale
        )
    else:
        target, decode_out = _decode_rows(
            q_padded, target, k_pages, v_pages, page_indices, lengths, sizes, scale
        )
    out = out.at[target].set(decode_out.astype(q.dtype))  # rows not decoding land past T

    # -- the other rows, chunk blocks --
    chunk_len = jnp.where(is_decode, 0, q_len)  # [R]

    def chunk_rows(out: jax.Array, block_q: int, enabled: jax.Array) -> jax.Array:
        return _chunk_rows(
            out, q_padded, k_pages, v_pages, kv_lens, page_indices, cu, chunk_len,
            sizes, scale, block_q, enabled,
        )  # fmt: skip

    small, large = chunk_blocks(n_tokens)
    if small < large:  # two loops, one of which has blocks to run
        fits = jnp.max(chunk_len) <= small
        out = chunk_rows(chunk_rows(out, small, fits), large, ~fits)
    else:
        out = chunk_rows(out, large, jnp.bool_(True))
    return out[:n_tokens]
