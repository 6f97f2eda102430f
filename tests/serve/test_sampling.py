"""SamplingParams validation and the on-device sampler's filters and determinism."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.serve.sampling import (
    SamplingParams,
    first_argmax,
    prompt_logprobs_of,
    sample,
    split_seed,
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("seed", 2**64),
        ("logprobs", -1),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
    ],
)
def test_validation_names_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_limits_against_model() -> None:
    p = SamplingParams(top_k=300, logprobs=2)
    with pytest.raises(ValueError, match="top_k"):
        p.check_limits(vocab_size=259, max_logprobs=5)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=6).check_limits(vocab_size=259, max_logprobs=5)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(259,)).check_limits(vocab_size=259, max_logprobs=5)


def test_split_seed_covers_signed_and_unsigned() -> None:
    assert split_seed(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert split_seed(2**32 + 5) == (1, 5)


_sample = jax.jit(sample)
V = 16


def _run(logits, temperature, top_k, top_p, seed, positions):
    b = len(temperature)
    seeds = np.asarray([split_seed(s) for s in seed], np.uint32)
    return np.asarray(
        _sample(
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(seeds),
            jnp.asarray(positions, jnp.int32).reshape(b),
        )
    )


def test_filters_and_greedy() -> None:
    rng = np.random.default_rng(0)
    n = 256
    logits = np.tile(rng.normal(size=(1, V)) * 2, (n, 1))
    order = np.argsort(-logits[0])
    positions = np.arange(n)
    greedy = _run(logits, [0.0] * n, [0] * n, [1.0] * n, [1] * n, positions)
    assert (greedy == order[0]).all()
    top3 = _run(logits, [5.0] * n, [3] * n, [1.0] * n, [1] * n, positions)
    assert set(top3) <= set(order[:3]) and len(set(top3)) == 3  # hot enough to use all 3
    nucleus = _run(logits, [1.0] * n, [0] * n, [1e-6] * n, [1] * n, positions)
    assert (nucleus == order[0]).all()  # tiny top_p keeps only the best token
    free = _run(logits, [5.0] * n, [0] * n, [1.0] * n, [1] * n, positions)
    assert len(set(free)) > 3


def test_first_argmax_is_argmax_with_ties_resolved_to_the_first() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(64, V)).astype(np.float32)  # many ties per row
    x[5] = -np.inf
    x[7, [3, 9]] = 100.0
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[7] == 3
    with_nan = np.asarray(first_argmax(jnp.asarray(np.full((1, V), np.nan, np.float32))))
    assert with_nan[0] == V - 1  # a real token id, never V


def test_top_p_keeps_the_nucleus() -> None:
    logits = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)] * 200))
    out = _run(logits, [1.0] * 200, [0] * 200, [0.7] * 200, [3] * 200, np.arange(200))
    assert set(out) == {0, 1}  # 0.5 + 0.3 covers 0.7; token 2 starts beyond it


def test_key_depends_only_on_seed_and_position() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, V))
    a = _run(logits, [1.0] * 4, [0] * 4, [1.0] * 4, [7, 7, 8, 7], [3, 3, 3, 4])
    # same row logits in another batch order: each row's token is unchanged
    b = _run(logits[::-1], [1.0] * 4, [0] * 4, [1.0] * 4, [7, 8, 7, 7], [4, 3, 3, 3])
    assert list(a) == list(b[::-1])


@pytest.mark.parametrize("block", [4, 16])  # 3 padded blocks (one asks nothing), or one
def test_prompt_logprobs_of_blocks_equal_one_log_softmax(block) -> None:
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)  # [T, D]
    weight = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)  # [D, V]
    targets = jnp.asarray([3, 7, -1, 0, -1, -1, -1, -1, 49, 2], jnp.int32)  # tokens 4-7: none

    def head(x):  # [1, t, D] -> [1, t, V]
        return x @ weight

    lp, rank, ids, lps = jax.jit(lambda h, t: prompt_logprobs_of(head, h, t, 3, block))(
        hidden, targets
    )
    logp = np.asarray(jax.nn.log_softmax(hidden @ weight, axis=-1))  # [T, V]
    for t, target in enumerate(np.asarray(targets)):
        if target < 0:
            continue
        assert lp[t] == pytest.approx(logp[t, target], abs=1e-5)
        assert rank[t] == 1 + np.sum(logp[t] > logp[t, target])
        assert ids[t].tolist() == np.argsort(-logp[t])[:3].tolist()
        np.testing.assert_allclose(lps[t], np.sort(logp[t])[::-1][:3], atol=1e-5)
    if block == 4:  # the block with no target was skipped: zeros
        assert not np.asarray(lp[4:8]).any() and not np.asarray(ids[4:8]).any()
