"""Attention kernels on a device mesh (8 simulated CPU devices): `per_shard` gives each
device its own rows and heads, with the single-device numbers and no all-gather."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tandem import kernels
from tandem.kernels import sharding
from tandem.kernels.paged_reference import ragged_paged_attention_reference
from tandem.kernels.testing import paged_step

AXES = kernels.MeshAxes(batch=("data", "fsdp"), heads=("tensor",))
_ROWS = [(1, 20), (7, 30), (1, 1), (0, 0), (1, 45)]


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(auto,) * 3)


@pytest.mark.parametrize("impl", ["pallas_interpret", "reference"])
def test_paged_attention_on_a_mesh_splits_kv_heads(impl: str) -> None:
    """The pool sharded over `tensor` by kv head: each device attends with its own heads
    (the kernel in a shard_map, the reference by XLA's partitioner), no gathers."""
    step = paged_step(11, _ROWS, n_heads=8, n_kv=4, head_dim=32, page_size=8, dtype=jnp.float32)
    want = np.asarray(jax.jit(ragged_paged_attention_reference)(*step))
    mesh = _mesh((1, 2, 4))
    heads = NamedSharding(mesh, PartitionSpec(None, "tensor", None))  # q [T, N, H]
    pool = NamedSharding(mesh, PartitionSpec("tensor", None, None, None))  # [K, P, Ps, H]
    step = step._replace(
        q=jax.device_put(step.q, heads),
        k_pages=jax.device_put(step.k_pages, pool),
        v_pages=jax.device_put(step.v_pages, pool),
    )
    run = jax.jit(lambda *a: kernels.paged_attention(*a, impl=impl, mesh_axes=AXES))
    with jax.set_mesh(mesh):
        compiled = run.lower(*step).compile()
        got = compiled(*step)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    if impl == "pallas_interpret":
        assert "all-gather" not in compiled.as_text()
        assert got.sharding.spec == PartitionSpec(None, "tensor", None)


def test_per_shard_specs(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    """B over the batch axes, N and K over the head axes when every count divides, else
    whole (logged once); without axes or a mesh the function is called directly."""
    monkeypatch.setattr(sharding, "_warned", set())
    seen = []

    def fn(q, k):
        seen.append((q.shape, k.shape))  # the per-device shapes the kernel would get
        return q

    q, k = jnp.zeros((4, 8, 16)), jnp.zeros((4, 2, 16))  # [B, N, H], [B, K, H]
    sharding.per_shard(fn, (q, k), ("BNH", "BKH"), None)
    with jax.set_mesh(_mesh((2, 1, 2))):
        jax.jit(lambda q, k: sharding.per_shard(fn, (q, k), ("BNH", "BKH"), AXES))(q, k)
    with (
        jax.set_mesh(_mesh((1, 2, 4))),
        caplog.at_level(logging.WARNING, logger="tandem.kernels.sharding"),
    ):
        for _ in range(2):  # two traces, one warning
            jax.jit(lambda q, k: sharding.per_shard(fn, (q, k), ("BNH", "BKH"), AXES))(q, k)
    assert seen == [
        ((4, 8, 16), (4, 2, 16)),  # no axes: called directly
        ((2, 4, 16), (2, 1, 16)),  # data 2 splits B, tensor 2 splits N and K
        ((2, 8, 16), (2, 2, 16)),  # tensor 4 does not divide K = 2: heads stay whole
        ((2, 8, 16), (2, 2, 16)),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "not divisible" in messages[0], messages
    with (
        pytest.raises(ValueError, match="do not name the dimensions"),
        jax.set_mesh(_mesh((2, 1, 2))),
    ):
        sharding.per_shard(fn, (q, k), ("BNH", "BK"), AXES)
