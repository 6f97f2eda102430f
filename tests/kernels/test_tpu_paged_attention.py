"""The Mosaic (TPU) ragged paged attention kernel, run in Pallas' TPU interpret mode on CPU
(DMAs, semaphores and VMEM simulated; uninitialized VMEM is NaN; out-of-bounds reads
raise): against the spec over a shape sweep, against jax's own TPU `paged_attention` (the
same page layout, decode only), NaN past every row, the write-then-attend cycle, and the
shape rules. On a TPU the `tpu`-marked class runs the same cases compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.kernels.paged_reference import ragged_paged_attention_reference, write_pages
from tandem.kernels.reference import attention_reference
from tandem.kernels.testing import PagedStep, paged_step, poison_unseen, tolerance
from tandem.kernels.tpu_paged_attention import ragged_paged_attention_tpu

from .test_paged_attention import Case, _padding_tokens, layout

_reference = jax.jit(ragged_paged_attention_reference)


# GQA 1/2/3/4/8, H 128/256, page sizes 8 (f32) / 16 / 32 / 128, one- and several-page
# tiles (1-16 DMAs per tile and pool), block_q 1-16 and auto, float32 and bfloat16, and
# each row layout (mixed, decode only, prefill only) at least once.
CASES = [
    Case(4, 2, 128, 16, 128, None, "float32"),
    Case(4, 2, 128, 16, 128, 4, "bfloat16"),
    Case(8, 1, 128, 8, 128, 2, "float32"),
    Case(4, 4, 256, 32, 256, 16, "float32", "prefill"),
    Case(8, 2, 128, 128, 128, 1, "bfloat16", "decode"),
    Case(6, 2, 128, 16, 256, 8, "float32"),  # G = 3: heads padded to 4 in the tile
    Case(16, 2, 128, 32, 128, None, "bfloat16", "prefill"),
    Case(2, 2, 128, 16, 128, 8, "float32", "decode"),
]


def _close(out: jax.Array, ref: jax.Array, dtype: str) -> None:
    atol, rtol = tolerance(jnp.dtype(dtype))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=rtol
    )


def _run(case: Case, step: PagedStep, *, interpret: bool = True) -> jax.Array:
    return ragged_paged_attention_tpu(
        *step, block_q=case.block_q, block_k=case.block_k, interpret=interpret
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    step = case.step()
    out = _run(case, step)
    _close(out, _reference(*step), case.dtype)
    assert not np.asarray(out, np.float32)[_padding_tokens(step)].any()


def test_decode_matches_jax_tpu_paged_attention() -> None:
    """Decode rows against jax's own Mosaic `paged_attention` (ops/tpu), which reads the
    same [K, P, Ps, H] pool, also in TPU interpret mode: an oracle for the page walk."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    rows = [(1, 5), (1, 32), (1, 33), (1, 64), (1, 17), (1, 1)]
    step = paged_step(
        6, rows, n_heads=8, n_kv=2, head_dim=128, page_size=16, dtype=jnp.bfloat16,
        padding_rows=0, padding_tokens=0, spare_pages=2,
    )  # fmt: skip
    table = jnp.clip(step.page_indices, 0, step.k_pages.shape[1] - 1)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        expected = paged_attention(
            step.q * jnp.asarray(128**-0.5, step.q.dtype), step.k_pages, step.v_pages,
            step.kv_lens, table, pages_per_compute_block=1,
        )  # fmt: skip
    out = ragged_paged_attention_tpu(*step, block_q=1, interpret=True)
    _close(out, expected, "bfloat16")


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.id)
def test_kernel_reads_nothing_past_each_row(case: Case) -> None:
    """NaN in every page and stale slot past each row's kv_len: output equal to the clean
    reference (pages past the row inside its last tile are fetched but masked, and V is
    zeroed past the block's last position)."""
    step = case.step(seed=2)
    need = -(-np.asarray(step.kv_lens) // case.page_size)
    poisoned = poison_unseen(step, list(need), stale_slots=True)
    _close(_run(case, poisoned), _reference(*step), case.dtype)


def test_write_then_attend_equals_causal_attention() -> None:
    """Two steps of `write_pages` + the kernel (a prompt chunk, then decode tokens and a
    second chunk) give causal attention over the whole sequences."""
    n_heads, n_kv, head_dim, page_size = 4, 2, 128, 8
    rng = np.random.default_rng(4)
    seq_q, seq_k, seq_v = (
        rng.standard_normal((3, 32, h, head_dim), np.float32) for h in (n_heads, n_kv, n_kv)
    )
    table = rng.permutation(16)[:12].reshape(3, 4)
    k_pages = jnp.zeros((n_kv, 16, page_size, head_dim), jnp.float32)
    v_pages = jnp.zeros_like(k_pages)
    full = np.asarray(jax.jit(attention_reference)(*map(jnp.asarray, (seq_q, seq_k, seq_v))))
    done = [0, 0, 0]
    for step_lens in ([17, 0, 25], [1, 9, 5]):
        tokens = [(r, done[r] + j) for r in range(3) for j in range(step_lens[r])]
        slots = [table[r, p // page_size] * page_size + p % page_size for r, p in tokens]
        q, k, v = (
            jnp.asarray(np.stack([s[r, p] for r, p in tokens])) for s in (seq_q, seq_k, seq_v)
        )
        k_pages, v_pages = write_pages(k_pages, v_pages, k, v, jnp.asarray(slots, jnp.int32))
        done = [d + n for d, n in zip(done, step_lens, strict=True)]
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(step_lens)]), jnp.int32)
        out = np.asarray(
            ragged_paged_attention_tpu(
                q, k_pages, v_pages, jnp.asarray(done, jnp.int32), jnp.asarray(table, jnp.int32),
                cu, jnp.asarray(3, jnp.int32), block_q=4, interpret=True,
            )
        )  # fmt: skip
        for i, (r, p) in enumerate(tokens):  # causal: position p sees exactly [0, p]
            np.testing.assert_allclose(out[i], full[r, p], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 64}, "head_dim=64"),
        ({"page_size": 8, "dtype": "bfloat16"}, "page_size=8 is not a multiple of 16"),
        ({"block_k": 96}, "block_k=96"),
        ({"block_k": 128, "page_size": 256}, "block_k=128"),
        ({"block_q": 3}, "block_q=3"),
        ({"n_heads": 6, "n_kv": 4}, "n_heads=6"),
        ({"dtype": "float16"}, "float16"),
    ],
    ids=["H64", "bf16-page-8", "block_k-96", "page-bigger-than-tile", "block_q-3", "N-not-K",
         "float16"],
)  # fmt: skip
def test_bad_shapes_raise(kwargs: dict, match: str) -> None:
    shape = {"n_heads": 4, "n_kv": 2, "head_dim": 128, "page_size": 16, "dtype": "float32"}
    shape |= {key: kwargs[key] for key in shape if key in kwargs}
    shape["dtype"] = jnp.dtype(shape["dtype"])
    step = paged_step(0, layout("decode", 16), **shape)
    static = {"block_k": 128, "block_q": 4} | {
        key: kwargs[key] for key in ("block_k", "block_q") if key in kwargs
    }
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_tpu(*step, interpret=True, **static)


# Compiled comparisons: the same cases plus serving-sized ones (Llama-3-8B heads).
TPU_CASES = [
    *CASES,
    Case(32, 8, 128, 16, 128, None, "bfloat16"),
    Case(32, 8, 128, 32, 256, None, "bfloat16", "decode"),
    Case(16, 8, 128, 64, 128, None, "bfloat16", "prefill"),
]


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiled Mosaic kernels need a TPU")
class TestCompiledOnTPU:
    @pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.id)
    def test_kernel_matches_reference(self, case: Case) -> None:
        step = case.step()
        # TPU matmuls of f32 run in bf16 passes at default precision (the reference too)
        atol, rtol = tolerance(jnp.dtype(case.dtype), gpu=True)
        np.testing.assert_allclose(
            np.asarray(_run(case, step, interpret=False), np.float32),
            np.asarray(_reference(*step), np.float32),
            atol=atol,
            rtol=rtol,
        )
