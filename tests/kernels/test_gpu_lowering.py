"""The kernels lower to Triton for CUDA - checked on CPU, no GPU needed.

`jax.export(..., platforms=["cuda"])` runs the Pallas -> Triton lowering (every primitive
needs a Triton rule, every loaded tile a power-of-two size) and embeds the Triton IR in a
`__gpu$xla.gpu.triton` custom call. What it cannot check is Triton's own compile to PTX and
the numbers; those are the `gpu`-marked tests' job on a GPU box.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from tandem.kernels.paged_attention import ragged_paged_attention
from tandem.kernels.prefill_attention import flash_attention

from .test_paged_attention import CASES as PAGED_CASES
from .test_paged_attention import GPU_CASES as PAGED_GPU_CASES
from .test_prefill_attention import CASES as PREFILL_CASES
from .test_prefill_attention import GPU_CASES as PREFILL_GPU_CASES

_TRITON = "__gpu$xla.gpu.triton"
Spec = jax.ShapeDtypeStruct


def _triton_calls(fn, *specs: Spec) -> int:
    exported = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)],
    )(*specs)
    return exported.mlir_module().count(f"@{_TRITON}")


def _prefill_specs(case):
    """(q, k/v, segment ids or None) shapes of a prefill GPU case."""
    dtype = jnp.dtype(case.dtype)
    q = Spec((case.batch, case.seq, case.n_heads, case.head_dim), dtype)
    kv = Spec((case.batch, case.seq, case.n_kv, case.head_dim), dtype)
    seg = Spec((case.batch, case.seq), jnp.int32) if case.segments else None
    return q, kv, seg


@pytest.mark.parametrize("case", list(dict.fromkeys(PREFILL_GPU_CASES)), ids=lambda c: c.id)
def test_prefill_lowers_to_triton(case) -> None:
    q, kv, seg = _prefill_specs(case)

    def fn(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, block_q=case.block_q, block_k=case.block_k)

    assert _triton_calls(fn, q, kv, kv, seg) == 1


@pytest.mark.parametrize("case", list(dict.fromkeys(PREFILL_GPU_CASES)), ids=lambda c: c.id)
def test_prefill_backward_lowers_to_triton(case) -> None:
    """jax.grad runs three kernels: the forward (saving the log-sum-exp), dK/dV and dQ."""
    q, kv, seg = _prefill_specs(case)

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, segment_ids=seg, block_q=case.block_q, block_k=case.block_k)
        return out.astype(jnp.float32).sum()

    assert _triton_calls(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg) == 3


@pytest.mark.parametrize("case", list(dict.fromkeys(PAGED_GPU_CASES)), ids=lambda c: c.id)
def test_paged_lowers_to_triton(case) -> None:
    step = case.step()  # the shapes and dtypes the numeric tests use
    fn = functools.partial(ragged_paged_attention, block_q=case.block_q, block_k=case.block_k)
    specs = [Spec(x.shape, x.dtype) for x in step]
    assert _triton_calls(fn, *specs) == 1


def test_cases_cover_the_interpret_sweep() -> None:
    """Every shape the CPU tests check numerically is also checked to lower for CUDA."""
    assert set(PREFILL_CASES) <= set(PREFILL_GPU_CASES)
    assert set(PAGED_CASES) <= set(PAGED_GPU_CASES)
