"""`Transformer.step` over a paged cache equals the full-sequence forward.

Sequences are fed in random pieces (prompt chunks and one-token decode rows mixed in one
step), their pages drawn at random from the pool, one sequence starting from pages
another one computed (a prefix-cache hit), with padding tokens and padding rows as the
engine adds them. Every row's logits must equal `Transformer.__call__`'s at the same
position, on one device and under a tensor-parallel mesh.
"""

from __future__ import annotations

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.sharding import MESH_AXES, param_shardings
from tandem.model.transformer import StepMetadata, Transformer, init_paged_cache

SMALL = [
    "vocab_size=300",
    "d_model=64",
    "n_layers=2",
    "n_heads=4",
    "n_kv_heads=2",
    "head_dim=16",
    "d_ff=128",
    "max_seq_len=64",
    "init_std=0.5",
]
PAGE_SIZE, NUM_PAGES, WIDTH = 4, 40, 12  # WIDTH: page-table columns (48 positions)
PAD_TOKENS, PAD_ROWS = 64, 8  # every step is padded to these, as the engine pads
# float32 logits (up to ~17 here, init_std=0.5) whose sums run in another order (a chunk
# instead of the whole sequence, a contraction split over devices) are equal to some tens
# of float32 ulps of the largest logit, not bit for bit: the order is XLA's choice for the
# host's CPU (3.3-3.8e-6 of the largest logit on an Intel Xeon, 2026-11-30, past a fixed
# 5e-5 there). A wrong position, page or mask is off by O(1).
LOGIT_TOL = 8e-6  # of the largest logit: ~64 float32 ulps


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_TOL * np.abs(want).max())


@dataclasses.dataclass
class Seq:
    tokens: list[int]
    pages: list[int]  # its page table
    done: int = 0  # tokens whose K/V are in the cache


def make_step(batch: list[tuple[Seq, int]]):
    """The padded step arrays for rows (seq, n new tokens), built from the page tables."""
    tokens, positions, slots, kv_lens, tables, cu = [], [], [], [], [], [0]
    for seq, n in batch:
        span = range(seq.done, seq.done + n)
        tokens += seq.tokens[seq.done : seq.done + n]
        positions += span
        slots += [seq.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in span]
        kv_lens.append(seq.done + n)
        used = -(-(seq.done + n) // PAGE_SIZE)
        tables.append(seq.pages[:used] + [0] * (WIDTH - used))
        cu.append(cu[-1] + n)
    t, r = len(tokens), len(batch)
    pad_t, pad_r = PAD_TOKENS - t, PAD_ROWS - r
    meta = StepMetadata(
        slot_mapping=np.array(slots + [-1] * pad_t, np.int32),
        kv_lens=np.array(kv_lens + [0] * pad_r, np.int32),
        page_indices=np.array(tables + [[0] * WIDTH] * pad_r, np.int32),
        cu_q_lens=np.array(cu + [t] * pad_r, np.int32),
        num_rows=np.int32(r),
    )
    logits_at = np.array([c - 1 for c in cu[1:]] + [0] * pad_r, np.int32)
    return (
        np.array(tokens + [0] * pad_t, np.int32),
        np.array(positions + [0] * pad_t, np.int32),
        meta,
        logits_at,
    )


def scenario(rng: random.Random, vocab: int) -> tuple[list[Seq], list[list[tuple[int, int]]]]:
    """Five sequences with random pages; a random schedule of chunks and decode rows.
    Sequence 4 starts with sequence 0's first 3 pages (12 tokens), already computed."""
    free = list(range(1, NUM_PAGES))
    rng.shuffle(free)
    lengths = [30, 9, 41, 17, 26]
    seqs = []
    for n in lengths:
        tokens = [rng.randrange(vocab) for _ in range(n)]
        seqs.append(Seq(tokens, [free.pop() for _ in range(-(-n // PAGE_SIZE))]))
    shared = 3
    seqs[4].tokens[: shared * PAGE_SIZE] = seqs[0].tokens[: shared * PAGE_SIZE]
    seqs[4].pages[:shared] = seqs[0].pages[:shared]
    schedule, active = [], [0, 1, 2, 3]
    while active:
        step, budget = [], PAD_TOKENS
        for i in list(active):
            seq = seqs[i]
            left = len(seq.tokens) - seq.done - sum(n for j, n in step if j == i)
            n = min(left, rng.choice([1, 1, 2, 5, 11]), budget)
            if n:
                step.append((i, n))
                budget -= n
        for i, n in step:
            seqs[i].done += n
        schedule.append(step)
        active = [i for i in active if seqs[i].done < len(seqs[i].tokens)]
        if 4 not in active and seqs[4].done == 0 and seqs[0].done >= shared * PAGE_SIZE:
            seqs[4].done = shared * PAGE_SIZE  # admitted with its cached prefix
            active.append(4)
    for seq in seqs:
        seq.done = 0
    seqs[4].done = shared * PAGE_SIZE
    return seqs, schedule


def full_logits(model: Transformer, tokens: list[int]) -> np.ndarray:  # [S, V]
    ids = jnp.asarray([tokens], jnp.int32)
    return np.asarray(model(ids, jnp.arange(len(tokens), dtype=jnp.int32)[None])[0])


def run_schedule(step_fn, params, cache, seqs, schedule):
    """Runs the schedule; returns [(seq index, position, logits)] for every row."""
    got = []
    for step in schedule:
        batch = [(seqs[i], n) for i, n in step]
        tokens, positions, meta, logits_at = make_step(batch)
        logits, cache = step_fn(params, tokens, positions, cache, meta, logits_at)
        for r, (i, n) in enumerate(step):
            got.append((i, seqs[i].done + n - 1, np.asarray(logits[r])))
        for seq, n in batch:
            seq.done += n
    return got


def jitted_step(graphdef, **jit_kw):
    def step(params, tokens, positions, cache, meta, logits_at):
        return nnx.merge(graphdef, params).step(tokens, positions, cache, meta, logits_at)

    return jax.jit(step, donate_argnums=(3,), **jit_kw)


def make(overrides=()) -> tuple[ModelConfig, Transformer]:
    cfg = load_config(ModelConfig, "tiny", [*SMALL, *overrides])
    return cfg, Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_paged_steps_equal_the_full_forward(seed: int) -> None:
    cfg, model = make()
    seqs, schedule = scenario(random.Random(seed), cfg.vocab_size)
    assert any(len(s) > 1 and any(n == 1 for _, n in s) for s in schedule)  # mixed steps
    assert any(n > 1 for s in schedule[1:] for _, n in s)  # chunks after the first step
    graphdef, params = nnx.split(model, nnx.Param)
    cache = init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE)
    got = run_schedule(jitted_step(graphdef), params, cache, seqs, schedule)
    want = [full_logits(model, seq.tokens) for seq in seqs]
    assert {i for i, _, _ in got} == set(range(5))
    for i, pos, logits in got:
        assert_logits_close(logits, want[i][pos])
        assert np.argmax(logits) == np.argmax(want[i][pos])


def test_padding_tokens_write_nothing_and_rows_read_only_their_pages() -> None:
    cfg, model = make()
    seqs, _ = scenario(random.Random(2), cfg.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    used = {p for s in seqs for p in s.pages}
    unused = [p for p in range(1, NUM_PAGES) if p not in used]
    assert unused
    # Garbage in the null page and in pages nobody holds (finite: attention masks what it
    # reads past a row's length by weight 0, and 0 * NaN would be NaN even in the spec).
    step = jitted_step(graphdef)
    inputs = make_step([(seqs[0], 7), (seqs[1], 3)])
    clean, _ = step(params, *inputs[:2], init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE), *inputs[2:])
    cache = init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE)
    cache = jax.tree.map(lambda pool: pool.at[:, jnp.array([0, *unused])].set(1e3), cache)
    logits, cache = step(params, *inputs[:2], cache, *inputs[2:])
    np.testing.assert_array_equal(logits, clean)
    assert_logits_close(logits[0], full_logits(model, seqs[0].tokens)[6])
    assert_logits_close(logits[1], full_logits(model, seqs[1].tokens)[2])
    for pool in (*cache.k, *cache.v):
        assert (np.asarray(pool)[:, [0, *unused]] == 1e3).all()  # padding wrote nothing


@pytest.mark.skipif(jax.device_count() < 2, reason="needs >= 2 (simulated) devices")
def test_tensor_parallel_step_equals_one_device() -> None:
    cfg, model = make()
    seqs, schedule = scenario(random.Random(3), cfg.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    one = run_schedule(
        jitted_step(graphdef), params, init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE),
        seqs, schedule,
    )  # fmt: skip
    for seq in seqs:
        seq.done = 0
    seqs[4].done = 3 * PAGE_SIZE
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 1, 2), MESH_AXES)
    sharded = jax.device_put(params, param_shardings(params, mesh))
    pool = NamedSharding(mesh, PartitionSpec("tensor", None, None, None))  # [K, P, Ps, H]
    cache = jax.device_put(init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE), pool)
    assert len(sharded["layers"]["wq"].value.sharding.device_set) == 2
    with jax.set_mesh(mesh):
        two = run_schedule(jitted_step(graphdef), sharded, cache, seqs, schedule)
    for (i, pos, a), (j, pos_b, b) in zip(one, two, strict=True):
        assert (i, pos) == (j, pos_b)
        assert_logits_close(b, a)
