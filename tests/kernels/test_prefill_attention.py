"""Causal flash-attention kernel == attention_reference (values and grads), interpret on CPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.kernels.prefill_attention import attention_reference, flash_attention
from tandem.kernels.testing import packed_segment_ids, prefill_inputs, tolerance

_reference = jax.jit(attention_reference)  # one compile per shape, not one per op


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    n_heads: int
    n_kv: int
    head_dim: int
    block_q: int
    block_k: int
    dtype: str
    segments: bool

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-T{self.seq}-N{self.n_heads}K{self.n_kv}-G{self.n_heads // self.n_kv}"
            f"-H{self.head_dim}-bq{self.block_q}-bk{self.block_k}-{self.dtype}"
            f"-{'segments' if self.segments else 'causal'}"
        )


# GQA ratios 1/2/4/8, head_dim 64/128, block_q < = > block_k, T not a power of two, all
# dtypes, with and without packed segments.
CASES = [
    Case(1, 64, 4, 4, 64, 16, 16, "float32", False),
    Case(2, 128, 8, 2, 64, 32, 16, "bfloat16", True),
    Case(2, 64, 8, 1, 128, 64, 64, "float32", True),
    Case(1, 128, 4, 2, 128, 16, 32, "bfloat16", False),
    Case(2, 64, 4, 4, 64, 32, 32, "float32", True),
    Case(2, 96, 4, 1, 64, 32, 32, "float16", False),
    Case(1, 128, 8, 1, 64, 128, 16, "float32", True),
]


def _inputs(case: Case, seed: int = 0):
    dtype = jnp.dtype(case.dtype)
    q, k, v = prefill_inputs(
        seed, case.batch, case.seq, case.n_heads, case.n_kv, case.head_dim, dtype
    )
    seg = packed_segment_ids(seed, case.batch, case.seq) if case.segments else None
    return q, k, v, seg


def _run(case: Case, *, interpret: bool) -> None:
    q, k, v, seg = _inputs(case)
    out = flash_attention(
        q,
        k,
        v,
        segment_ids=seg,
        block_q=case.block_q,
        block_k=case.block_k,
        interpret=interpret,
    )
    ref = _reference(q, k, v, segment_ids=seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    atol, rtol = tolerance(q.dtype, gpu=not interpret)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=rtol
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    _run(case, interpret=True)


# The backward kernels (dK/dV per key tile, dQ per query tile): GQA 1/2/4/8, block_q < = >
# block_k (the dK/dV walk starts mid-tile when block_q < block_k), T not a power of two,
# every dtype, with and without segments.
GRAD_CASES = [
    Case(1, 64, 4, 2, 64, 16, 32, "float32", True),
    Case(2, 32, 8, 2, 64, 16, 16, "bfloat16", False),
    Case(1, 128, 8, 1, 64, 64, 16, "float32", True),
    Case(2, 96, 4, 4, 32, 32, 32, "float16", True),
    Case(1, 64, 8, 2, 128, 16, 64, "bfloat16", True),
]


def _grads(case: Case, *, interpret: bool):
    q, k, v, seg = _inputs(case, seed=1)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, np.float32), q.dtype)

    def loss_kernel(q, k, v):
        out = flash_attention(
            q, k, v, segment_ids=seg, block_q=case.block_q, block_k=case.block_k,
            interpret=interpret,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    def loss_ref(q, k, v):
        out = attention_reference(q, k, v, segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    got = jax.jit(jax.grad(loss_kernel, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    return got, want


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_grads_match_reference(case: Case) -> None:
    got, want = _grads(case, interpret=True)
    atol, rtol = tolerance(jnp.dtype(case.dtype))
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
            err_msg=f"d{name}",
        )  # fmt: skip


def test_segments_isolate_documents() -> None:
    """Changing document 0's keys/values must not change document 1's outputs."""
    q, k, v = prefill_inputs(3, 1, 64, 2, 1, 64, jnp.float32)
    seg = jnp.asarray(np.repeat([0, 1], [24, 40])[None], jnp.int32)  # [1, T]
    out = flash_attention(q, k, v, segment_ids=seg, block_q=16, block_k=16, interpret=True)
    k2 = k.at[:, :24].set(7.0)
    v2 = v.at[:, :24].set(-7.0)
    out2 = flash_attention(q, k2, v2, segment_ids=seg, block_q=16, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(out2[:, 24:]), np.asarray(out[:, 24:]), atol=1e-6)
    assert not np.allclose(np.asarray(out2[:, :24]), np.asarray(out[:, :24]))


@pytest.mark.parametrize(
    ("seq", "head_dim", "block_q", "match"),
    [(48, 64, 32, "T=48"), (64, 48, 16, "head_dim=48"), (64, 64, 24, "block_q=24")],
    ids=["T-not-multiple", "head_dim-48", "block_q-not-pow2"],
)
def test_bad_shapes_raise(seq: int, head_dim: int, block_q: int, match: str) -> None:
    q, k, v = prefill_inputs(0, 1, seq, 2, 1, head_dim, jnp.float32)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, block_q=block_q, block_k=16, interpret=True)


GPU_CASES = [
    *CASES,
    Case(2, 1024, 32, 8, 128, 64, 64, "bfloat16", True),
    Case(1, 2048, 16, 4, 64, 128, 64, "bfloat16", False),
]
GPU_GRAD_CASES = [*GRAD_CASES, Case(1, 1024, 16, 4, 64, 64, 64, "bfloat16", True)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
class TestCompiledOnGPU:
    @pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
    def test_kernel_matches_reference(self, case: Case) -> None:
        _run(case, interpret=False)

    @pytest.mark.parametrize("case", GPU_GRAD_CASES, ids=lambda c: c.id)
    def test_grads_match_reference(self, case: Case) -> None:
        got, want = _grads(case, interpret=False)
        atol, rtol = tolerance(jnp.dtype(case.dtype), gpu=True)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol
            )
