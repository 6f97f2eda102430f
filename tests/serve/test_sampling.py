"""SamplingParams validation and the on-device sampler's filters and determinism."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.serve.sampling import (
    MAX_LOGIT_BIAS,
    MAX_MIN_TOKENS_STOP_IDS,
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
        ("presence_penalty", 2.5),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("logit_bias", ((5, 100.5),)),
        ("logit_bias", ((5, math.nan),)),
        ("logit_bias", ((-1, 1.0),)),
        ("logit_bias", ((3, 1.0), (3, 2.0))),
        ("logit_bias", tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1))),
        ("logit_bias", ((3, 1.0, 2.0),)),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > max_tokens (16)
    ],
)
def test_validation_names_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_min_tokens_caps_the_stop_ids_it_holds_off() -> None:
    many = tuple(range(MAX_MIN_TOKENS_STOP_IDS + 1))
    SamplingParams(stop_token_ids=many)  # fine without min_tokens
    with pytest.raises(ValueError, match=r"^stop_token_ids=.*min_tokens"):
        SamplingParams(stop_token_ids=many, min_tokens=1)
    edge = SamplingParams(max_tokens=4, min_tokens=4, logit_bias=((0, -100.0), (1, 100)))
    assert edge.min_tokens == 4 and not edge.penalized
    assert SamplingParams(repetition_penalty=1.1).penalized


def test_limits_against_model() -> None:
    p = SamplingParams(top_k=300, logprobs=2)
    with pytest.raises(ValueError, match="top_k"):
        p.check_limits(vocab_size=259, max_logprobs=5)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=6).check_limits(vocab_size=259, max_logprobs=5)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(259,)).check_limits(vocab_size=259, max_logprobs=5)
    with pytest.raises(ValueError, match=r"^logit_bias=259 .*vocab_size"):
        SamplingParams(logit_bias=((3, 1.0), (259, 1.0))).check_limits(
            vocab_size=259, max_logprobs=5
        )


def test_split_seed_covers_signed_and_unsigned() -> None:
    assert split_seed(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert split_seed(2**32 + 5) == (1, 5)


_sample = jax.jit(sample)
V = 16


def _run(logits, temperature, top_k, top_p, seed, positions, min_p=None):
    b = len(temperature)
    min_p = np.zeros(b) if min_p is None else min_p
    seeds = np.asarray([split_seed(s) for s in seed], np.uint32)
    return np.asarray(
        _sample(
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(min_p, jnp.float32),
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


def test_min_p_keeps_tokens_within_its_fraction_of_the_top_one() -> None:
    n = 400
    probs = np.asarray([0.4, 0.3, 0.15, 0.1, 0.05] + [1e-9] * (V - 5))
    logits = np.log(np.tile(probs, (n, 1)))
    out = _run(logits, [1.0] * n, [0] * n, [1.0] * n, [3] * n, np.arange(n), [0.3] * n)
    assert set(out) == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 = 0.12; 0.1 is not
    # after temperature: at T = 0.5 the probabilities are ~ p^2, so 0.15 falls below
    cold = _run(logits, [0.5] * n, [0] * n, [1.0] * n, [3] * n, np.arange(n), [0.3] * n)
    assert set(cold) == {0, 1}
    # min_p, then top_p over what min_p kept (vLLM's order): renormalised over tokens 0-2
    # (0.85), tokens 0 and 1 hold 0.82 >= 0.8, so token 2 goes; top_p alone keeps it (the
    # mass before it is 0.7), and so would top_p first, then min_p
    nucleus = _run(logits, [1.0] * n, [0] * n, [0.8] * n, [3] * n, np.arange(n))
    assert set(nucleus) == {0, 1, 2}
    both = _run(logits, [1.0] * n, [0] * n, [0.8] * n, [3] * n, np.arange(n), [0.3] * n)
    assert set(both) == {0, 1}
    greedy = _run(logits[:4], [0.0] * 4, [0] * 4, [1.0] * 4, [3] * 4, np.arange(4), [1.0] * 4)
    assert (greedy == 0).all()
    # min_p = 1 keeps only the top token(s); 0 changes nothing
    one = _run(logits, [1.0] * n, [0] * n, [1.0] * n, [3] * n, np.arange(n), [1.0] * n)
    assert set(one) == {0}
    off = _run(logits[:64], [1.0] * 64, [0] * 64, [1.0] * 64, [3] * 64, np.arange(64), [0.0] * 64)
    same = _run(logits[:64], [1.0] * 64, [0] * 64, [1.0] * 64, [3] * 64, np.arange(64))
    assert list(off) == list(same)


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
