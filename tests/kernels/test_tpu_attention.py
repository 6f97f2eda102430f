"""Splash attention (jax's Mosaic kernel, the TPU training/prefill path) behind
`attention_reference`'s contract: forward and grads in interpret mode on CPU over a shape
sweep (GQA, segments, block sizes, dtypes), segment isolation, shape rules. On a TPU the
`tpu`-marked class runs the same cases compiled."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.kernels.reference import attention_reference
from tandem.kernels.testing import packed_segment_ids, prefill_inputs, tolerance
from tandem.kernels.tpu_attention import pick_block, splash_attention

_reference = jax.jit(attention_reference)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    n_heads: int
    n_kv: int
    head_dim: int
    block: int | None  # None: pick_block(T)
    dtype: str
    segments: bool

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-T{self.seq}-N{self.n_heads}K{self.n_kv}-G{self.n_heads // self.n_kv}"
            f"-H{self.head_dim}-b{self.block or 'auto'}-{self.dtype}"
            f"-{'segments' if self.segments else 'causal'}"
        )

    def inputs(self, seed: int = 0):
        q, k, v = prefill_inputs(
            seed, self.batch, self.seq, self.n_heads, self.n_kv, self.head_dim,
            jnp.dtype(self.dtype),
        )  # fmt: skip
        seg = packed_segment_ids(seed, self.batch, self.seq) if self.segments else None
        return q, k, v, seg


# GQA 1/2/3/4/8, H 64/128, one to four blocks per row (T 128-512, T = 384 not a power of
# two), blocks 128/256/512, float32 and bfloat16, with and without packed segments.
CASES = [
    Case(1, 128, 4, 4, 128, None, "float32", False),
    Case(2, 256, 8, 2, 128, 128, "bfloat16", True),
    Case(2, 256, 4, 1, 64, 256, "float32", True),
    Case(1, 384, 6, 2, 128, None, "float32", True),
    Case(1, 512, 8, 1, 64, 128, "bfloat16", False),
    Case(1, 512, 4, 2, 64, None, "float32", True),
]
GRAD_CASES = [
    Case(1, 256, 4, 2, 128, 128, "float32", True),
    Case(2, 128, 4, 1, 64, None, "bfloat16", False),
    Case(1, 384, 6, 2, 64, 128, "float32", True),
    Case(1, 256, 8, 2, 128, 256, "bfloat16", True),
]


def _forward(case: Case, *, interpret: bool) -> None:
    q, k, v, seg = case.inputs()
    out = splash_attention(q, k, v, segment_ids=seg, block=case.block, interpret=interpret)
    ref = _reference(q, k, v, segment_ids=seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    atol, rtol = tolerance(q.dtype, gpu=not interpret)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=rtol
    )


def _grads(case: Case, *, interpret: bool) -> None:
    q, k, v, seg = case.inputs(seed=1)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, np.float32), q.dtype)

    def loss(fn):
        def f(q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    got = loss(
        lambda q, k, v: splash_attention(
            q, k, v, segment_ids=seg, block=case.block, interpret=interpret
        )
    )(q, k, v)
    want = loss(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg))(q, k, v)
    atol, rtol = tolerance(q.dtype, gpu=not interpret)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
            err_msg=f"d{name}",
        )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case: Case) -> None:
    _forward(case, interpret=True)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_grads_match_reference(case: Case) -> None:
    """splash's dQ and dK/dV kernels (GQA: dK/dV summed over each kv head's group)."""
    _grads(case, interpret=True)


def test_segments_isolate_documents() -> None:
    """Changing document 0's keys/values must not change document 1's outputs."""
    q, k, v = prefill_inputs(3, 1, 256, 2, 1, 128, jnp.float32)
    seg = jnp.asarray(np.repeat([0, 1], [100, 156])[None], jnp.int32)  # [1, T]
    out = splash_attention(q, k, v, segment_ids=seg, interpret=True)
    k2, v2 = k.at[:, :100].set(7.0), v.at[:, :100].set(-7.0)
    out2 = splash_attention(q, k2, v2, segment_ids=seg, interpret=True)
    np.testing.assert_allclose(np.asarray(out2[:, 100:]), np.asarray(out[:, 100:]), atol=1e-6)
    assert not np.allclose(np.asarray(out2[:, :100]), np.asarray(out[:, :100]))


def test_block_choice() -> None:
    assert [pick_block(t) for t in (128, 384, 512, 1024, 2048, 640, 96)] == [
        128, 128, 512, 512, 512, 128, None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("seq", "head_dim", "dtype", "match"),
    [
        (96, 128, "float32", "T=96"),
        (128, 32, "float32", "head_dim=32"),
        (128, 128, "float16", "float16"),
    ],
    ids=["T-not-multiple-of-128", "head_dim-32", "float16"],
)
def test_bad_shapes_raise(seq: int, head_dim: int, dtype: str, match: str) -> None:
    q, k, v = prefill_inputs(0, 1, seq, 2, 1, head_dim, jnp.dtype(dtype))
    with pytest.raises(ValueError, match=match):
        splash_attention(q, k, v, interpret=True)


# Compiled comparisons: the same cases plus training-sized ones (llama3-1b / 8B heads).
TPU_CASES = [
    *CASES,
    Case(2, 2048, 32, 8, 64, None, "bfloat16", True),
    Case(1, 4096, 32, 8, 128, None, "bfloat16", True),
]
TPU_GRAD_CASES = [*GRAD_CASES, Case(2, 2048, 32, 8, 64, None, "bfloat16", True)]


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiled Mosaic kernels need a TPU")
class TestCompiledOnTPU:
    @pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.id)
    def test_forward_matches_reference(self, case: Case) -> None:
        _forward(case, interpret=False)

    @pytest.mark.parametrize("case", TPU_GRAD_CASES, ids=lambda c: c.id)
    def test_grads_match_reference(self, case: Case) -> None:
        _grads(case, interpret=False)
