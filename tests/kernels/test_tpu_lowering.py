"""The Mosaic kernels lower for TPU - checked on CPU, no TPU needed.

`jax.export(..., platforms=["tpu"])` runs Pallas' Mosaic lowering (every primitive needs a
Mosaic rule, block shapes must satisfy the (8, 128) tiling rules, scalar prefetch and
DMAs must type-check) and embeds the Mosaic module in a `tpu_custom_call`. What it
cannot check is Mosaic's own compile on the chip (layouts, VMEM limits) and the numbers;
those are the `tpu`-marked tests' job on a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from tandem.kernels.tpu_attention import splash_attention
from tandem.kernels.tpu_paged_attention import ragged_paged_attention_tpu

from .test_tpu_attention import CASES as SPLASH_CASES
from .test_tpu_attention import GRAD_CASES as SPLASH_GRAD_CASES
from .test_tpu_attention import TPU_CASES as SPLASH_TPU_CASES
from .test_tpu_attention import TPU_GRAD_CASES as SPLASH_TPU_GRAD_CASES
from .test_tpu_paged_attention import CASES as PAGED_CASES
from .test_tpu_paged_attention import TPU_CASES as PAGED_TPU_CASES

Spec = jax.ShapeDtypeStruct


def tpu_calls(fn, *specs: Spec) -> int:
    """Mosaic kernels in `fn`'s TPU lowering."""
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*specs)
    return exported.mlir_module().count("@tpu_custom_call")


def _splash_specs(case):
    dtype = jnp.dtype(case.dtype)
    q = Spec((case.batch, case.seq, case.n_heads, case.head_dim), dtype)
    kv = Spec((case.batch, case.seq, case.n_kv, case.head_dim), dtype)
    seg = Spec((case.batch, case.seq), jnp.int32) if case.segments else None
    return q, kv, seg


@pytest.mark.parametrize("case", SPLASH_TPU_CASES, ids=lambda c: c.id)
def test_splash_forward_lowers_for_tpu(case) -> None:
    q, kv, seg = _splash_specs(case)

    def fn(q, k, v, seg):
        return splash_attention(q, k, v, segment_ids=seg, block=case.block)

    assert tpu_calls(fn, q, kv, kv, seg) == 1


@pytest.mark.parametrize("case", SPLASH_TPU_GRAD_CASES, ids=lambda c: c.id)
def test_splash_backward_lowers_for_tpu(case) -> None:
    """jax.grad runs three kernels: the forward (saving the log-sum-exp), dQ and dK/dV."""
    q, kv, seg = _splash_specs(case)

    def loss(q, k, v, seg):
        out = splash_attention(q, k, v, segment_ids=seg, block=case.block)
        return out.astype(jnp.float32).sum()

    assert tpu_calls(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg) == 3


@pytest.mark.parametrize("case", PAGED_TPU_CASES, ids=lambda c: c.id)
def test_paged_lowers_for_tpu(case) -> None:
    step = case.step()  # the shapes and dtypes the numeric tests use

    def fn(*args):
        return ragged_paged_attention_tpu(*args, block_q=case.block_q, block_k=case.block_k)

    assert tpu_calls(fn, *(Spec(x.shape, x.dtype) for x in step)) == 1


def test_cases_cover_the_interpret_sweep() -> None:
    """Every configuration the CPU tests check numerically is also checked to lower."""
    assert set(SPLASH_CASES) <= set(SPLASH_TPU_CASES)
    assert set(SPLASH_GRAD_CASES) <= set(SPLASH_TPU_GRAD_CASES)
    assert set(PAGED_CASES) <= set(PAGED_TPU_CASES)
