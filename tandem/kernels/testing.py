"""Inputs and tolerances shared by the kernel tests and benchmarks/paged_bench.py.

Inputs come from numpy's generator (no per-shape jax.random compile) so a sweep of many
shapes spends its time in the kernels, not in building inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# (atol, rtol) against the reference in the same dtype. bf16 has an 8-bit mantissa
# (eps 2^-8 ~ 0.004); the kernel and the reference round probabilities to bf16 at
# different points (unnormalized vs normalized), so outputs of magnitude ~1 may differ by a
# few bf16 ulps. On GPU, float32 dots run as TF32 (10-bit mantissa) in both.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (2e-5, 2e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (4e-3, 4e-3),
}
GPU_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-2, 1e-2),  # TF32 dots in both kernel and reference
    "bfloat16": (2e-2, 2e-2),
    "float16": (4e-3, 4e-3),
}


def tolerance(dtype: jnp.dtype, *, gpu: bool = False) -> tuple[float, float]:
    return (GPU_TOLERANCES if gpu else TOLERANCES)[jnp.dtype(dtype).name]


def prefill_inputs(
    seed: int,
    batch: int,
    seq: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k [B, T, K, H], v [B, T, K, H], standard normal."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, n_heads, head_dim), np.float32)
    k = rng.standard_normal((batch, seq, n_kv, head_dim), np.float32)
    v = rng.standard_normal((batch, seq, n_kv, head_dim), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))  # type: ignore[return-value]


def packed_segment_ids(seed: int, batch: int, seq: int, max_segments: int = 4) -> jax.Array:
    """[B, T] int32: each row a few contiguous documents of random lengths (ids 0, 1, ...)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        n_cuts = rng.integers(0, max_segments)
        cuts = np.sort(rng.choice(np.arange(1, seq), size=n_cuts, replace=False))
        row = np.zeros(seq, np.int32)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


class PagedStep(NamedTuple):
    """The arguments of one paged attention call (`ragged_paged_attention_reference`)."""

    q: jax.Array  # [T, N, H]
    k_pages: jax.Array  # [K, P, Ps, H]
    v_pages: jax.Array  # [K, P, Ps, H]
    kv_lens: jax.Array  # [R] int32
    page_indices: jax.Array  # [R, Pr] int32
    cu_q_lens: jax.Array  # [R + 1] int32
    num_rows: jax.Array  # [] int32


def paged_step(
    seed: int,
    rows: Sequence[tuple[int, int]],
    *,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    page_size: int,
    dtype: jnp.dtype,
    padding_rows: int = 2,
    padding_tokens: int = 3,
    spare_pages: int = 3,
) -> PagedStep:
    """A ragged step: `rows` are (query tokens, cache length) of the rows in use.

    Each row's pages are drawn at random from the pool (never contiguous in order), and
    everything the contract says is ignored holds garbage: page-table entries past a
    row's pages, the `padding_rows` rows past num_rows (random lengths, zero cu_q_lens
    entries), the `padding_tokens` query tokens past the last row, and `spare_pages`
    pool pages no row uses.
    """
    rng = np.random.default_rng(seed)
    page_counts = [-(-kv_len // page_size) for _, kv_len in rows]
    pages_per_seq = max([*page_counts, 1]) + 1
    n_pages = sum(page_counts) + spare_pages
    n_rows = len(rows) + padding_rows
    pool = rng.permutation(n_pages)
    table = rng.integers(-n_pages, 2 * n_pages, (n_rows, pages_per_seq))  # even out of range
    used = 0
    for r, count in enumerate(page_counts):
        table[r, :count] = pool[used : used + count]
        used += count
    q_lens = [q_len for q_len, _ in rows]
    cu = np.zeros(n_rows + 1, np.int64)  # padding rows' entries stay 0
    cu[1 : len(rows) + 1] = np.cumsum(q_lens)
    kv_lens = rng.integers(0, pages_per_seq * page_size + 1, n_rows)
    kv_lens[: len(rows)] = [kv_len for _, kv_len in rows]
    n_tokens = sum(q_lens) + padding_tokens
    q = rng.standard_normal((n_tokens, n_heads, head_dim), np.float32)
    k = rng.standard_normal((n_kv, n_pages, page_size, head_dim), np.float32)
    v = rng.standard_normal((n_kv, n_pages, page_size, head_dim), np.float32)
    return PagedStep(
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        *(jnp.asarray(x, jnp.int32) for x in (kv_lens, table, cu)),
        jnp.asarray(len(rows), jnp.int32),
    )


def poison_unseen(step: PagedStep, seen_pages: list[int], *, stale_slots: bool) -> PagedStep:
    """NaN in every pool page a correct computation need not read: pages no row uses, and
    the page-table entries of row r from `seen_pages[r]` on (pointed at a NaN page; the
    entries between the row's own pages and those are pointed at a finite page); with
    `stale_slots` also the slots past kv_len in a row's last page. The reference would
    turn any NaN it reads into NaN outputs (0 * NaN)."""
    k, v = np.array(step.k_pages, np.float32), np.array(step.v_pages, np.float32)
    table = np.array(step.page_indices)
    page_size = k.shape[2]
    n_rows = int(step.num_rows)
    kv_lens = np.asarray(step.kv_lens)
    need = -(-kv_lens // page_size)
    owned = {int(table[r, i]) for r in range(n_rows) for i in range(need[r])}
    spare = sorted(set(range(k.shape[1])) - owned)
    k[:, spare], v[:, spare] = np.nan, np.nan
    for r in range(n_rows):
        table[r, need[r] : seen_pages[r]] = min(owned)
        table[r, seen_pages[r] :] = spare[0]
        if stale_slots and kv_lens[r] % page_size:
            last = table[r, (kv_lens[r] - 1) // page_size]
            k[:, last, kv_lens[r] % page_size :] = np.nan
            v[:, last, kv_lens[r] % page_size :] = np.nan
    dtype = step.k_pages.dtype
    return step._replace(
        k_pages=jnp.asarray(k, dtype),
        v_pages=jnp.asarray(v, dtype),
        page_indices=jnp.asarray(table, jnp.int32),
    )
