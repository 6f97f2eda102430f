"""The logits processors against vLLM's formulas written out in torch (random logits and
random histories), and the token-id pool's history read back through page tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.serve.logits_processors import (
    ProcessorInputs,
    add_at,
    apply_penalties,
    process_logits,
    token_counts,
    write_token_ids,
)

torch = pytest.importorskip("torch")

V, PS = 50, 4


def vllm_apply_penalties(logits, prompt_tokens, output_tokens, presence, frequency, repetition):
    """vllm/model_executor/layers/utils.py `apply_penalties` (token lists padded with V)."""
    num_seqs, vocab = logits.shape

    def bin_counts_and_mask(tokens):
        counts = torch.zeros((num_seqs, vocab + 1), dtype=torch.long)
        counts.scatter_add_(1, tokens, torch.ones_like(tokens))
        counts = counts[:, :vocab]
        return counts, counts > 0

    _, prompt_mask = bin_counts_and_mask(prompt_tokens)
    output_bin_counts, output_mask = bin_counts_and_mask(output_tokens)
    repetition = repetition.unsqueeze(dim=1).repeat(1, vocab)
    penalties = torch.where(prompt_mask | output_mask, repetition, 1.0)
    logits = logits.clone()
    positive = logits > 0
    logits[positive] /= penalties[positive]
    logits[~positive] *= penalties[~positive]
    logits -= frequency.unsqueeze(dim=1) * output_bin_counts
    logits -= presence.unsqueeze(dim=1) * output_mask
    return logits


def _padded(lists: list[list[int]]) -> torch.Tensor:
    width = max(1, max(map(len, lists)))
    return torch.tensor([seq + [V] * (width - len(seq)) for seq in lists])


def _random_rows(rng, rows: int):
    """Random (prompt, output) histories with repeats, and per-row penalties (row 0 off)."""
    prompts = [rng.integers(0, V, rng.integers(1, 12)).tolist() for _ in range(rows)]
    outputs = [rng.integers(0, V // 3, rng.integers(0, 10)).tolist() for _ in range(rows)]
    presence = rng.uniform(-2, 2, rows).astype(np.float32)
    frequency = rng.uniform(-2, 2, rows).astype(np.float32)
    repetition = rng.uniform(0.5, 2, rows).astype(np.float32)
    presence[0], frequency[0], repetition[0] = 0.0, 0.0, 1.0
    return prompts, outputs, presence, frequency, repetition


def _pool_with(histories: list[list[int]], rng) -> tuple[np.ndarray, np.ndarray]:
    """A token pool holding each history on scattered pages (written with write_token_ids,
    padding slots -1 included), and the rows' page tables [R, W]."""
    width = max(-(-len(h) // PS) for h in histories) + 1
    pages = 1 + rng.permutation(len(histories) * width)  # page 0 is the null page
    tables = pages.reshape(len(histories), width).astype(np.int32)
    tokens, slots = [], []
    for r, h in enumerate(histories):
        for pos, t in enumerate(h):
            tokens.append(t)
            slots.append(tables[r, pos // PS] * PS + pos % PS)
    tokens += [7, 7, 7]  # padding tokens of the step: slot -1 writes nowhere
    slots += [-1, -1, -1]
    pool = jnp.full((1 + len(pages), PS), 3, jnp.int32)  # stale ids where nothing was written
    pool = write_token_ids(pool, jnp.asarray(tokens, jnp.int32), jnp.asarray(slots, jnp.int32))
    return np.asarray(pool), tables


def test_write_token_ids_drops_padding_slots() -> None:
    pool = jnp.zeros((3, PS), jnp.int32)
    out = write_token_ids(pool, jnp.asarray([5, 6, 9]), jnp.asarray([4, -1, 11]))
    want = np.zeros((3, PS), np.int32)
    want[1, 0], want[2, 3] = 5, 9  # -1 did not wrap around to the last slot
    np.testing.assert_array_equal(np.asarray(out), want)


def test_token_counts_from_the_pool() -> None:
    rng = np.random.default_rng(0)
    prompts, outputs, *_ = _random_rows(rng, 6)
    histories = [p + o for p, o in zip(prompts, outputs, strict=True)]
    pool, tables = _pool_with([[*h, 1] for h in histories], rng)  # + the sampled token's slot
    kv_lens = np.asarray([len(h) for h in histories], np.int32)  # which is not history
    prompt_lens = np.asarray([len(p) for p in prompts], np.int32)
    seen, counts = jax.jit(token_counts, static_argnums=4)(pool, tables, kv_lens, prompt_lens, V)
    for r in range(len(histories)):
        np.testing.assert_array_equal(np.asarray(counts[r]), np.bincount(outputs[r], minlength=V))
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(seen[r])), sorted(set(prompts[r])))


def test_penalties_match_vllm() -> None:
    rng = np.random.default_rng(1)
    rows = 8
    prompts, outputs, presence, frequency, repetition = _random_rows(rng, rows)
    logits = rng.normal(size=(rows, V)).astype(np.float32) * 3
    want = vllm_apply_penalties(
        torch.tensor(logits), _padded(prompts), _padded(outputs),
        torch.tensor(presence), torch.tensor(frequency), torch.tensor(repetition),
    ).numpy()  # fmt: skip
    seen = np.zeros((rows, V), bool)
    counts = np.zeros((rows, V), np.int32)
    for r in range(rows):
        seen[r, prompts[r]] = True
        counts[r] = np.bincount(outputs[r], minlength=V)
    got = apply_penalties(
        jnp.asarray(logits), jnp.asarray(seen), jnp.asarray(counts),
        jnp.asarray(presence), jnp.asarray(frequency), jnp.asarray(repetition),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[0], logits[0])  # a row with all off
    assert not np.allclose(want[1:], logits[1:])  # the penalties did something


def test_process_logits_bias_min_tokens_then_penalties() -> None:
    """Through the pool, as in the engine step: bias (and min_tokens' ban) first, then the
    penalties on the biased logits (vLLM v1's order)."""
    rng = np.random.default_rng(2)
    rows, m, s = 5, 6, 3
    prompts, outputs, presence, frequency, repetition = _random_rows(rng, rows)
    histories = [p + o for p, o in zip(prompts, outputs, strict=True)]
    pool, tables = _pool_with(histories, rng)
    logits = rng.normal(size=(rows, V)).astype(np.float32) * 3
    bias_ids = np.full((rows, m), -1, np.int32)
    bias_values = np.zeros((rows, m), np.float32)
    bias_ids[1, :3] = [4, 0, V - 1]
    bias_values[1, :3] = [100.0, -7.5, 2.0]
    bias_ids[3, 0], bias_values[3, 0] = 9, -100.0
    banned = np.full((rows, s), -1, np.int32)
    banned[2, :2] = [1, 5]
    x = ProcessorInputs(
        np.asarray([len(p) for p in prompts], np.int32), presence, frequency, repetition,
        bias_ids, bias_values, banned,
    )  # fmt: skip
    kv_lens = np.asarray([len(h) for h in histories], np.int32)
    got = np.asarray(jax.jit(process_logits)(logits, pool, tables, kv_lens, x))

    biased = logits.copy()
    for r in range(rows):
        for t, b in zip(bias_ids[r], bias_values[r], strict=True):
            if t >= 0:
                biased[r, t] += b
        biased[r, [t for t in banned[r] if t >= 0]] = -1e30
    want = vllm_apply_penalties(
        torch.tensor(biased), _padded(prompts), _padded(outputs),
        torch.tensor(presence), torch.tensor(frequency), torch.tensor(repetition),
    ).numpy()  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert got[1].argmax() == 4 and got[2, 1] < -1e29 and got[2, 5] < -1e29


def test_nothing_asked_leaves_the_logits_alone() -> None:
    rng = np.random.default_rng(3)
    rows = 4
    logits = rng.normal(size=(rows, V)).astype(np.float32)
    x = ProcessorInputs(
        np.zeros(rows, np.int32), np.zeros(rows, np.float32), np.zeros(rows, np.float32),
        np.ones(rows, np.float32), np.full((rows, 2), -1, np.int32),
        np.full((rows, 2), 5.0, np.float32), np.full((rows, 2), -1, np.int32),
    )  # fmt: skip
    pool = np.zeros((4, PS), np.int32)
    tables = np.ones((rows, 2), np.int32)
    got = process_logits(logits, pool, tables, np.full(rows, 6, np.int32), x)
    np.testing.assert_array_equal(np.asarray(got), logits)
    one = add_at(jnp.asarray(logits), jnp.asarray([[-1, 2]] * rows), jnp.ones((rows, 2)))
    np.testing.assert_allclose(np.asarray(one)[:, 2], logits[:, 2] + 1)
    np.testing.assert_array_equal(np.asarray(one)[:, V - 1], logits[:, V - 1])  # -1: no wrap
