"""Ragged GQA decode kernel == decode_attention_reference, interpret mode on CPU, compiled on GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.kernels.decode_attention import (
    auto_num_splits,
    decode_attention_reference,
    ragged_decode_attention,
)
from tandem.kernels.testing import decode_inputs, length_patterns, tolerance

_reference = jax.jit(decode_attention_reference)  # one compile per shape, not one per op


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    n_heads: int
    n_kv: int
    head_dim: int
    max_len: int
    block_k: int
    num_splits: int | None  # None: auto_num_splits
    dtype: str

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-N{self.n_heads}K{self.n_kv}-G{self.n_heads // self.n_kv}"
            f"-H{self.head_dim}-S{self.max_len}-bk{self.block_k}-P{self.num_splits or 'auto'}"
            f"-{self.dtype}"
        )


# Every slot count (1/3/8), GQA ratio (1/2/4/8, and 32 > the 16-row tile), head_dim
# (64/128), block size (16..128), split count (1..8, auto) and dtype appears at least once.
CASES = [
    Case(1, 8, 8, 64, 128, 32, 1, "float32"),
    Case(1, 8, 4, 128, 256, 64, 4, "bfloat16"),
    Case(3, 8, 2, 64, 256, 32, 4, "float32"),
    Case(3, 8, 1, 128, 128, 16, 8, "bfloat16"),
    Case(8, 4, 2, 64, 64, 16, 2, "float32"),
    Case(8, 16, 2, 64, 128, 128, 1, "bfloat16"),
    Case(3, 16, 4, 128, 256, 128, 2, "float32"),
    Case(8, 2, 2, 128, 256, 64, None, "bfloat16"),
    Case(3, 4, 1, 64, 192, 64, 3, "float32"),  # S not a power of two, 3 splits
    Case(1, 32, 1, 64, 64, 32, 2, "bfloat16"),  # G = 32: two 16-row tiles' worth
    Case(3, 8, 2, 64, 256, 64, None, "float16"),
    Case(8, 8, 8, 64, 32, 16, 1, "float32"),
]


def _run(case: Case, *, interpret: bool, seed: int = 0) -> None:
    dtype = jnp.dtype(case.dtype)
    q, k, v = decode_inputs(
        seed, case.batch, case.n_heads, case.n_kv, case.max_len, case.head_dim, dtype
    )
    atol, rtol = tolerance(dtype, gpu=not interpret)
    for name, lengths in length_patterns(seed, case.batch, case.max_len).items():
        out = ragged_decode_attention(
            q,
            k,
            v,
            lengths,
            block_k=case.block_k,
            num_splits=case.num_splits,
            interpret=interpret,
        )
        ref = _reference(q, k, v, lengths)
        assert out.shape == q.shape and out.dtype == q.dtype
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(ref, np.float32),
            atol=atol,
            rtol=rtol,
            err_msg=f"lengths={name} {np.asarray(lengths)}",
        )
        empty = np.asarray(lengths) == 0
        assert not np.asarray(out, np.float32)[empty].any(), "length-0 slots must be zeros"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    _run(case, interpret=True)


def test_tiles_past_length_are_never_read() -> None:
    """NaN in every tile wholly past a slot's length must not reach the output.

    The reference would turn those NaNs into NaN outputs (0 * NaN); the kernel stays finite
    only because its loop never loads those tiles - the work-skipping is real.
    """
    block_k, max_len = 16, 128
    q, k, v = decode_inputs(1, 3, 4, 2, max_len, 64, jnp.float32)
    lengths = jnp.array([5, 40, 0], jnp.int32)
    tile_end = -(-np.asarray(lengths) // block_k) * block_k  # [B] first fully-invalid index
    poison = np.arange(max_len)[None, :] >= tile_end[:, None]  # [B, S]
    poison = jnp.asarray(poison)[:, None, :, None]  # [B, 1, S, 1]
    k_bad = jnp.where(poison, jnp.nan, k)
    v_bad = jnp.where(poison, jnp.nan, v)
    out = ragged_decode_attention(
        q, k_bad, v_bad, lengths, block_k=block_k, num_splits=4, interpret=True
    )
    ref = _reference(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_stale_entries_inside_last_tile_are_masked() -> None:
    """Huge stale values after lengths[b] in the partially valid tile change nothing."""
    q, k, v = decode_inputs(2, 3, 4, 2, 64, 64, jnp.float32)
    lengths = jnp.array([7, 33, 64], jnp.int32)
    stale = (jnp.arange(64)[None, :] >= lengths[:, None])[:, None, :, None]  # [B, 1, S, 1]
    out_clean = ragged_decode_attention(q, k, v, lengths, block_k=16, interpret=True)
    out_stale = ragged_decode_attention(
        q,
        jnp.where(stale, 1e4, k),
        jnp.where(stale, -1e4, v),
        lengths,
        block_k=16,
        interpret=True,
    )
    np.testing.assert_allclose(np.asarray(out_stale), np.asarray(out_clean), atol=1e-6)


def test_works_inside_jit_with_traced_lengths() -> None:
    q, k, v = decode_inputs(3, 3, 8, 2, 64, 64, jnp.bfloat16)

    @jax.jit
    def step(q, k, v, lengths):
        return ragged_decode_attention(q, k, v, lengths + 1, block_k=32, interpret=True)

    lengths = jnp.array([0, 20, 62], jnp.int32)
    out = step(q, k, v, lengths)
    ref = _reference(q, k, v, lengths + 1)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_k": 48}, "block_k=48"),
        ({"block_k": 128, "max_len": 64}, "max_len S=64"),
        ({"num_splits": 3}, "num_splits=3"),
        ({"head_dim": 24}, "head_dim=24"),
        ({"n_heads": 6, "n_kv": 4}, "n_heads=6"),
    ],
    ids=["block_k-not-pow2", "S-not-multiple", "bad-splits", "head_dim-24", "N-not-multiple-K"],
)
def test_bad_shapes_raise(kwargs: dict, match: str) -> None:
    shape = {"n_heads": 4, "n_kv": 2, "max_len": 64, "head_dim": 64} | {
        key: kwargs[key] for key in ("n_heads", "n_kv", "max_len", "head_dim") if key in kwargs
    }
    q, k, v = decode_inputs(0, 2, shape["n_heads"], shape["n_kv"], shape["max_len"],
                            shape["head_dim"], jnp.float32)  # fmt: skip
    static = {key: kwargs[key] for key in ("block_k", "num_splits") if key in kwargs}
    static.setdefault("block_k", 16)
    with pytest.raises(ValueError, match=match):
        ragged_decode_attention(q, k, v, jnp.array([1, 2], jnp.int32), interpret=True, **static)


@pytest.mark.parametrize(
    ("batch", "n_kv", "max_len", "block_k"),
    [(1, 1, 32768, 128), (1, 8, 4096, 128), (64, 8, 32768, 128), (3, 2, 384, 128), (8, 1, 16, 16)],
)
def test_auto_num_splits_divides_tiles(batch: int, n_kv: int, max_len: int, block_k: int) -> None:
    splits = auto_num_splits(batch, n_kv, max_len, block_k)
    n_tiles = max_len // block_k
    assert 1 <= splits <= n_tiles and n_tiles % splits == 0
    if batch * n_kv >= 256:
        assert splits == 1  # already enough programs: no partials to combine


# Compiled comparisons: the same cases plus serving-sized ones. Run through the device
# tool on a GPU box; skipped on CPU (and TPU, where the Triton kernels do not apply).
GPU_CASES = [
    *CASES,
    Case(16, 32, 8, 128, 4096, 128, None, "bfloat16"),
    Case(64, 32, 8, 128, 2048, 128, None, "bfloat16"),
    Case(2, 8, 8, 64, 8192, 128, 16, "float32"),
]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
class TestCompiledOnGPU:
    @pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
    def test_kernel_matches_reference(self, case: Case) -> None:
        _run(case, interpret=False)
