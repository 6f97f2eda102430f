"""Paged attention: the reference against jax's own, the Pallas kernel (interpret mode on
CPU, compiled on GPU) and the CPU blocked variant against the reference, and the write side."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.kernels.bucketed_reference import (
    common_prefix_pages,
    page_buckets,
    ragged_paged_attention_blocked,
)
from tandem.kernels.paged_attention import ragged_paged_attention
from tandem.kernels.paged_reference import (
    ragged_paged_attention_reference,
    step_rows,
    write_pages,
)
from tandem.kernels.reference import attention_reference
from tandem.kernels.testing import PagedStep, paged_step, poison_unseen, tolerance

_reference = jax.jit(ragged_paged_attention_reference)
_blocked = jax.jit(ragged_paged_attention_blocked)


def layout(name: str, page_size: int) -> list[tuple[int, int]]:
    """(query tokens, cache length) of the rows in use."""
    ps = page_size
    return {
        # decode rows of length 1, a page boundary and one past it; a chunk on a cached
        # prefix; a fresh prompt; a row in use with nothing to do; a longer decode row
        "mixed": [
            (1, 1), (1, ps), (1, ps + 1), (3, 2 * ps), (ps + 3, 3 * ps + 5), (19, 19),
            (0, 0), (1, 70),
        ],
        "decode": [(1, 5), (1, 2 * ps), (1, 33), (1, 1), (1, 3 * ps - 1)],
        "prefill": [(40, 40), (ps, 2 * ps)],
        # steps of at most 32 tokens: chunks that fit a block of 16, and one that does not
        "small": [(1, 40), (13, 50), (1, 5), (5, 5)],
        "small-wide": [(1, 40), (19, 50), (1, 5), (5, 5)],
    }[name]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    n_heads: int
    n_kv: int
    head_dim: int
    page_size: int
    block_k: int
    block_q: int | None  # None: auto_block_q
    dtype: str
    rows: str = "mixed"

    @property
    def id(self) -> str:
        return (
            f"N{self.n_heads}K{self.n_kv}-G{self.n_heads // self.n_kv}-H{self.head_dim}"
            f"-ps{self.page_size}-bk{self.block_k}-bq{self.block_q or 'auto'}-{self.dtype}"
            f"-{self.rows}"
        )

    def step(self, seed: int = 0) -> PagedStep:
        return paged_step(
            seed,
            layout(self.rows, self.page_size),
            n_heads=self.n_heads,
            n_kv=self.n_kv,
            head_dim=self.head_dim,
            page_size=self.page_size,
            dtype=jnp.dtype(self.dtype),
        )


# GQA 1/2/4 (and 3, 8), page sizes 8/16/32, one- and several-page tiles, block_q giving 16-64
# query rows, float32 and bfloat16, and each row layout appear at least once.
CASES = [
    Case(4, 2, 64, 16, 64, None, "float32"),
    Case(4, 2, 64, 8, 16, 8, "bfloat16"),
    Case(4, 4, 32, 32, 32, 16, "float32"),
    Case(8, 2, 64, 16, 16, 4, "bfloat16"),
    Case(8, 2, 128, 8, 64, None, "float32", "decode"),
    Case(2, 2, 64, 32, 64, 32, "bfloat16", "decode"),
    Case(8, 1, 64, 16, 32, 2, "float32", "prefill"),
    Case(16, 4, 64, 8, 32, None, "bfloat16", "prefill"),
    Case(4, 1, 16, 16, 16, 4, "float32"),
    Case(8, 8, 64, 16, 128, 16, "float32"),
    Case(6, 2, 32, 16, 32, None, "float32"),  # G = 3: heads padded to 4 in the tile
]


def _close(out: jax.Array, ref: jax.Array, dtype: str, *, gpu: bool = False) -> None:
    atol, rtol = tolerance(jnp.dtype(dtype), gpu=gpu)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=rtol
    )


def _padding_tokens(step: PagedStep) -> np.ndarray:  # [T] bool
    return np.arange(step.q.shape[0]) >= int(step.cu_q_lens[int(step.num_rows)])


@pytest.mark.parametrize("rows", ["mixed", "decode", "prefill"])
def test_reference_matches_jax_ragged_paged_attention_reference(rows: str) -> None:
    """The spec against jax's own (`ops.tpu.ragged_paged_attention`'s pure-jnp reference,
    whose pool interleaves K and V heads: [P, Ps, 2K, H])."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import (
        ref_ragged_paged_attention,
    )

    step = paged_step(
        1, layout(rows, 16), n_heads=8, n_kv=2, head_dim=64, page_size=16, dtype=jnp.float32
    )
    n_kv, n_pages, page_size, head_dim = step.k_pages.shape
    kv_pages = jnp.stack(
        [step.k_pages.transpose(1, 2, 0, 3), step.v_pages.transpose(1, 2, 0, 3)], axis=3
    ).reshape(n_pages, page_size, 2 * n_kv, head_dim)
    expected = ref_ragged_paged_attention(
        step.q, kv_pages, step.kv_lens, step.page_indices, step.cu_q_lens,
        step.num_rows[None], sm_scale=head_dim**-0.5,
    )  # fmt: skip
    out = np.asarray(_reference(*step))
    real = ~_padding_tokens(step)
    np.testing.assert_allclose(out[real], np.asarray(expected), atol=2e-5, rtol=2e-5)
    assert not out[~real].any(), "padding tokens get zeros"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    step = case.step()
    out = ragged_paged_attention(*step, block_q=case.block_q, block_k=case.block_k, interpret=True)
    _close(out, _reference(*step), case.dtype)
    assert not np.asarray(out, np.float32)[_padding_tokens(step)].any()


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=lambda c: c.id)
def test_kernel_reads_nothing_past_each_row(case: Case) -> None:
    """With NaN in everything past each row's kv_len, the kernel's output equals the
    clean reference: it loads only the tiles its queries see and zeroes V past them."""
    step = case.step(seed=2)
    need = -(-np.asarray(step.kv_lens) // case.page_size)
    poisoned = poison_unseen(step, list(need), stale_slots=True)
    out = ragged_paged_attention(
        *poisoned, block_q=case.block_q, block_k=case.block_k, interpret=True
    )
    _close(out, _reference(*step), case.dtype)


@pytest.mark.parametrize(
    ("rows", "page_size", "dtype"),
    [("mixed", 16, "float32"), ("decode", 8, "bfloat16"), ("prefill", 32, "float32"),
     ("mixed", 128, "float32"), ("small", 16, "float32"), ("small", 8, "bfloat16"),
     ("small-wide", 16, "float32")],
    ids=lambda x: f"{x}",
)  # fmt: skip
def test_blocked_reads_only_its_buckets_and_equals_the_reference(
    rows: str, page_size: int, dtype: str
) -> None:
    """The CPU variant reads, per decode group or chunk block, the page-count bucket
    (`page_buckets`) of what its queries see, and whatever those pages hold past the
    row's positions (NaN here: other sequences' pages, a freed page's leftovers in the
    last one) leaves it exact."""
    step = paged_step(
        3, layout(rows, page_size), n_heads=4, n_kv=2, head_dim=64,
        page_size=page_size, dtype=jnp.dtype(dtype),
    )  # fmt: skip
    need = [-(-int(n) // page_size) for n in np.asarray(step.kv_lens)[: int(step.num_rows)]]
    _close(_blocked(*poison_unseen(step, need, stale_slots=True)), _reference(*step), dtype)
    assert page_buckets(64, 16) == (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)


def test_common_prefix_pages_are_the_decode_rows_shared_full_pages() -> None:
    """The leading table columns every decode row holds the same page in, each wholly
    before the row's new token; prompt-chunk rows do not count, one decode row shares
    nothing."""
    table = jnp.array([[5, 6, 7, 9], [5, 6, 7, 8], [5, 6, 7, 0], [1, 2, 0, 0]], jnp.int32)
    decode = jnp.array([True, True, True, False])

    def common(kv_lens: list[int], is_decode: jax.Array = decode) -> int:
        return int(common_prefix_pages(table, jnp.array(kv_lens, jnp.int32), is_decode, 16))

    assert common([4 * 16, 4 * 16, 3 * 16 + 5, 30]) == 3
    assert common([4 * 16, 4 * 16, 3 * 16, 30]) == 2  # row 2's new token is in page 7
    assert common([4 * 16, 2 * 16 + 1, 3 * 16 + 5, 30]) == 2
    assert common([4 * 16] * 4, jnp.array([True, True, True, True])) == 0  # row 3 differs
    assert common([4 * 16] * 4, jnp.array([True, False, False, False])) == 0


@pytest.mark.parametrize(
    ("page_size", "shared", "dtype"),
    [(16, 18, "float32"), (128, 5, "bfloat16"), (16, 3, "float32")],
)
def test_blocked_decode_rows_sharing_a_prefix_equal_the_reference(
    page_size: int, shared: int, dtype: str
) -> None:
    """Decode rows whose tables start with the same pages (a system prompt shared through
    prefix caching) attend to them in one pass for all of them (in whole slices of
    PREFIX_TOKENS positions; less than a slice is read row by row), merged with each
    row's own pages: the reference's result, beside a prompt chunk over the same prefix,
    with more decode rows than one pass takes."""
    ps, n = page_size, shared
    rows = [(1, n * ps + 1), (40, n * ps + 40), (1, (n + 1) * ps), (1, (n + 3) * ps + 7)]
    rows += [(1, n * ps + 2 + i) for i in range(18)]
    step = paged_step(4, rows, n_heads=4, n_kv=2, head_dim=64, page_size=ps, dtype=jnp.dtype(dtype))
    table = np.array(step.page_indices)
    table[: len(rows), :n] = table[0, :n]
    step = step._replace(page_indices=jnp.asarray(table))
    _, q_len = step_rows(step.cu_q_lens, step.num_rows)
    assert int(common_prefix_pages(step.page_indices, step.kv_lens, q_len == 1, ps)) == n
    _close(_blocked(*step), _reference(*step), dtype)


@pytest.mark.parametrize("impl", ["reference", "blocked", "kernel"])
def test_write_then_attend_equals_causal_attention(impl: str) -> None:
    """Three sequences written page by page over two steps (a prompt chunk, then decode
    tokens and a second chunk), each step's outputs equal to causal attention over the
    whole sequences (`attention_reference`)."""
    n_heads, n_kv, head_dim, page_size = 4, 2, 32, 8
    lengths = [21, 9, 30]
    rng = np.random.default_rng(4)
    seq_q, seq_k, seq_v = (
        rng.standard_normal((len(lengths), 32, h, head_dim), np.float32)
        for h in (n_heads, n_kv, n_kv)
    )
    pool_pages, pages_per_seq = 16, 4
    table = rng.permutation(pool_pages)[: len(lengths) * pages_per_seq].reshape(3, 4)
    k_pages = jnp.zeros((n_kv, pool_pages, page_size, head_dim), jnp.float32)
    v_pages = jnp.zeros_like(k_pages)
    run = {
        "reference": _reference,
        "blocked": _blocked,
        "kernel": lambda *a: ragged_paged_attention(*a, block_k=16, interpret=True),
    }[impl]
    causal = np.asarray(attention_reference(*map(jnp.asarray, (seq_q, seq_k, seq_v))))
    done = [0, 0, 0]
    for step_lens in ([17, 0, 25], [1, 9, 5]):  # query tokens per sequence
        tokens = [(r, done[r] + j) for r in range(3) for j in range(step_lens[r])]
        slots = [table[r, p // page_size] * page_size + p % page_size for r, p in tokens]
        n_pad = 4  # padding tokens: slot -1, never written
        q = jnp.asarray(np.stack([seq_q[r, p] for r, p in tokens] + [seq_q[0, 0]] * n_pad))
        k = jnp.asarray(np.stack([seq_k[r, p] for r, p in tokens] + [seq_k[0, 0]] * n_pad))
        v = jnp.asarray(np.stack([seq_v[r, p] for r, p in tokens] + [seq_v[0, 0]] * n_pad))
        slot_mapping = jnp.asarray(slots + [-1] * n_pad, jnp.int32)
        k_pages, v_pages = write_pages(k_pages, v_pages, k, v, slot_mapping)
        done = [d + n for d, n in zip(done, step_lens, strict=True)]
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(step_lens)]), jnp.int32)
        out = np.asarray(
            run(q, k_pages, v_pages, jnp.asarray(done, jnp.int32), jnp.asarray(table, jnp.int32),
                cu, jnp.asarray(3, jnp.int32))
        )  # fmt: skip
        for i, (r, p) in enumerate(tokens):  # position p of a causal pass sees 0..p only
            np.testing.assert_allclose(out[i], causal[r, p], atol=2e-5, rtol=2e-5)
        assert not out[len(tokens) :].any()
    assert done == [18, 9, 30] and max(done) <= pages_per_seq * page_size


def test_write_pages_scatters_to_slots_in_place() -> None:
    n_kv, pages, page_size, head_dim = 2, 5, 4, 16
    rng = np.random.default_rng(5)
    k_pages = jnp.asarray(rng.standard_normal((n_kv, pages, page_size, head_dim)), jnp.float32)
    v_pages = k_pages + 1
    k = jnp.asarray(rng.standard_normal((4, n_kv, head_dim)), jnp.float32)
    slots = jnp.asarray([13, -1, 0, 19], jnp.int32)  # page 3 + 1, padding, page 0, last slot
    expected_k, expected_v = np.array(k_pages), np.array(v_pages)
    for t, slot in enumerate(np.asarray(slots)):
        if slot >= 0:
            expected_k[:, slot // page_size, slot % page_size] = k[t]
            expected_v[:, slot // page_size, slot % page_size] = -k[t]
    write = jax.jit(write_pages, donate_argnums=(0, 1))
    hlo = write.lower(k_pages, v_pages, k, -k, slots).compile().as_text()
    assert "input_output_alias" in hlo and "copy(" not in hlo, "pools updated in place"
    new_k, new_v = write(k_pages, v_pages, k, -k, slots)
    np.testing.assert_array_equal(np.asarray(new_k), expected_k)
    np.testing.assert_array_equal(np.asarray(new_v), expected_v)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_k": 48}, "block_k=48"),
        ({"block_k": 16, "page_size": 32}, "page_size=32"),
        ({"block_q": 3}, "block_q=3"),
        ({"block_q": 4, "n_heads": 2}, "= 4 query rows"),
        ({"head_dim": 24}, "head_dim=24"),
        ({"n_heads": 6, "n_kv": 4}, "n_heads=6"),
    ],
    ids=["block_k-not-pow2", "page-bigger-than-tile", "block_q-not-pow2", "tile-under-16",
         "head_dim-24", "N-not-multiple-K"],
)  # fmt: skip
def test_bad_shapes_raise(kwargs: dict, match: str) -> None:
    shape = {"n_heads": 4, "n_kv": 2, "head_dim": 32, "page_size": 16}
    shape |= {key: kwargs[key] for key in shape if key in kwargs}
    step = paged_step(0, layout("decode", 16), dtype=jnp.float32, **shape)
    static = {"block_k": 32, "block_q": 8} | {
        key: kwargs[key] for key in ("block_k", "block_q") if key in kwargs
    }
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*step, interpret=True, **static)


# Compiled comparisons: the same cases plus serving-sized ones. Run through the device
# tool on a GPU box; skipped on CPU.
GPU_CASES = [
    *CASES,
    Case(32, 8, 64, 16, 64, None, "bfloat16"),
    Case(32, 8, 128, 16, 128, None, "bfloat16", "decode"),
    Case(16, 8, 64, 16, 64, None, "float32", "prefill"),
]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
class TestCompiledOnGPU:
    @pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
    def test_kernel_matches_reference(self, case: Case) -> None:
        step = case.step()
        out = ragged_paged_attention(*step, block_q=case.block_q, block_k=case.block_k)
        _close(out, _reference(*step), case.dtype, gpu=True)
