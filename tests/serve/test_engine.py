"""The JAX engine on a tiny random model: exact greedy parity with the model's own forward,
chunked prefill, prefix caching, preemption and async scheduling that change no output, no
compile after warm-up, seeded sampling independent of batch neighbours, tensor parallel,
the CPU's float32 cache for a bfloat16 model, and serving a bundle through
`python -m tandem.serve`."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.kernels.bucketed_reference import page_buckets
from tandem.model.config import ModelConfig
from tandem.model.transformer import Transformer
from tandem.serve.config import ServeConfig
from tandem.serve.engine import (
    JaxEngine,
    PackedLayout,
    kv_bytes_per_token,
    pick_tensor_parallel,
    token_buckets,
    warmup_plans,
)
from tandem.serve.orchestrator import Orchestrator, Output, merge_outputs
from tandem.serve.sampling import SamplingParams
from tandem.serve.scheduler import Request, Scheduler
from tests.xla_flags import on_devices

REPO = Path(__file__).resolve().parents[2]
CFG = ModelConfig(
    vocab_size=260,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=128,
    max_seq_len=64,
    init_std=0.5,
)  # fmt: skip  (init_std 0.5: a random model whose greedy output is not one repeated token)
# Pages of 4 and a 32-token step: prompts of the tests below are chunked and share pages.
SCFG = ServeConfig(max_seqs=4, page_size=4, max_num_batched_tokens=32, tensor_parallel=1)
PROMPTS = ["hello", "the quick brown fox jumps", "a", "zzzzzzzzzzzzzzzzzzzzzzzzzzzz", "tandem!"]


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model, tokenizer) -> JaxEngine:
    eng = JaxEngine.from_model(model, tokenizer, SCFG)
    eng.warmup()
    return eng


def greedy_reference(model: Transformer):
    """Greedy decode with Transformer.__call__ (full forward, no cache), one compile."""
    graphdef, params = nnx.split(model, nnx.Param)
    width = model.cfg.max_seq_len

    @jax.jit
    def next_logits(params, tokens, n):  # tokens [1, S] right-padded; logits at n - 1
        positions = jnp.arange(width)[None]
        logits = nnx.merge(graphdef, params)(tokens, positions)
        return jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=False)

    def run(prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        seq, out, all_logits = list(prompt), [], []
        for _ in range(steps):
            padded = np.zeros((1, width), np.int32)
            padded[0, : len(seq)] = seq
            logits = np.asarray(next_logits(params, padded, np.int32(len(seq))))
            token = int(np.argmax(logits))
            out.append(token)
            all_logits.append(logits)
            seq.append(token)
        return out, all_logits

    return run


@pytest.fixture(scope="module")
def reference_greedy(model):
    return greedy_reference(model)


def _generate(engine, tokenizer, requests, *, neighbours: int = 0):
    """Runs [(prompt, SamplingParams)] through a fresh orchestrator (after `neighbours`
    sampled filler requests); returns token lists and the outputs."""
    orch = Orchestrator(engine)
    results = {}
    filler = [
        (
            tokenizer.encode(f"filler {i} " * 2),
            SamplingParams(max_tokens=12, temperature=0.9, seed=i),
        )
        for i in range(neighbours)
    ]
    for i, (ids, params) in enumerate(filler + list(requests)):
        results[i] = []
        orch.submit(ids, params, results[i].append)
    for _ in range(500):
        if not orch.step():
            break
    outs = [results[i] for i in range(len(filler), len(filler) + len(requests))]
    return [[t for o in r for t in o.token_ids] for r in outs], outs


def drive(engine, requests: list[tuple[list[int], SamplingParams]], *, ahead: bool = False, **cfg):
    """The scheduler (with `cfg` overrides of the engine's config) and the engine, with no
    serving loop: returns each request's tokens and the scheduler. `ahead`: async
    scheduling's order (step N+1 planned and run before step N is committed)."""
    sched = Scheduler(dataclasses.replace(engine.serve_cfg, **cfg), cache_key=engine.cache_key)
    for i, (ids, params) in enumerate(requests):
        sched.add_request(Request(str(i), ids, params, seed=params.seed or 0))
    reqs = list(sched.requests.values())
    in_flight = None
    for _ in range(1000):
        if not sched.has_unfinished_requests() and in_flight is None:
            break
        plan = sched.schedule()
        done = (plan, engine.step(plan)) if plan.num_rows else None
        if ahead:
            done, in_flight = in_flight, done
        if done is not None:
            sched.update_from_output(done[0], done[1].tokens(done[0].num_rows))
    assert not sched.has_unfinished_requests() and sched.kv.usage == 0.0
    return [r.output_token_ids for r in reqs], sched


def test_token_buckets() -> None:
    # powers of two up to the budget; finer up to max_seqs, where decode-only steps land
    assert token_buckets(32, 4) == (8, 16, 32)
    assert token_buckets(512, 8) == (8, 16, 32, 64, 128, 256, 512)
    assert token_buckets(100, 8) == (8, 16, 32, 64, 100)
    assert token_buckets(512, 64) == (8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512)
    assert token_buckets(512, 50) == (8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512)
    assert token_buckets(100, 100) == (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100)
    big = token_buckets(512, 256)
    assert big[big.index(128) :] == (128, 160, 192, 224, 256, 512)
    for budget, seqs in [(512, 64), (512, 50), (100, 100), (512, 256), (64, 64), (96, 3)]:
        buckets = token_buckets(budget, seqs)
        assert buckets == tuple(sorted(set(buckets))) and buckets[-1] == budget
        # a decode step of n running sequences pads by at most a quarter (8 below 32)
        for n in range(1, seqs + 1):
            padded = next(b for b in buckets if b >= n)
            assert padded - n < max(8, n // 4 + 1), (budget, seqs, n, padded)


def test_the_budget_is_capped_at_what_a_step_can_hold(model, tokenizer) -> None:
    """No step computes more than max_seqs x max_len tokens, nor more than the pool has
    slots for: the engine does not compile buckets past that (each costs warm-up time)."""

    def engine(**sizes) -> JaxEngine:
        return JaxEngine.from_model(model, tokenizer, ServeConfig(tensor_parallel=1, **sizes))

    small = engine(max_seqs=2, max_len=24, page_size=4)  # budget left at its 2,048
    assert small.serve_cfg.max_num_batched_tokens == 48
    assert small.token_buckets() == (8, 16, 32, 48)
    pool = engine(max_seqs=2, max_len=24, page_size=4, kv_cache_tokens=5 * 4)  # 4 + null
    assert pool.serve_cfg.max_num_batched_tokens == 16
    # a pool smaller than max_seqs rows still gives each running sequence its row
    rows = engine(max_seqs=8, max_len=24, page_size=4, kv_cache_tokens=2 * 4)
    assert rows.serve_cfg.max_num_batched_tokens == 8
    assert engine(max_seqs=2, max_len=64, max_num_batched_tokens=32).token_buckets()[-1] == 32


@pytest.mark.parametrize(("tokens", "rows"), [(8, 8), (64, 32), (512, 64), (8, 2), (16, 1)])
def test_warmup_plans_fit_their_bucket_write_nothing_and_reach_every_length(
    tokens: int, rows: int
) -> None:
    """The warm-up steps of a token bucket stay within it, write no KV slot, and hold
    decode rows and prompt chunks at every page-count bucket the CPU attention branches
    on, and decode rows sharing their pages."""
    width, page_size = 32, 64
    plans = warmup_plans(tokens, rows, width, page_size, num_pages=100)
    lengths: dict[str, set[int]] = {"decode": set(), "chunk": set()}
    for plan in plans:
        assert plan.num_tokens <= tokens and plan.num_rows <= rows
        assert (plan.slot_mapping == -1).all()
        for q_len, kv_len in zip(np.diff(plan.cu_q_lens), plan.kv_lens, strict=True):
            lengths["decode" if q_len == 1 else "chunk"].add(int(kv_len) // page_size)
    assert lengths["decode"] >= set(page_buckets(width, page_size))
    assert lengths["chunk"] == set(page_buckets(width, page_size))
    shared = [p for p in plans if p.num_rows >= 2 and (p.page_indices == p.page_indices[0]).all()]
    assert (rows >= 2) == bool(shared)


def test_packed_inputs_unpack_to_the_step_inputs_bit_for_bit(engine, tokenizer) -> None:
    """The step's one host buffer carries every StepInputs field exactly: negative ids,
    uint32 seeds past 2**31, float32 values (bit-cast, not converted) and bools."""
    bucket = engine.token_buckets()[-1]
    request = Request("r", tokenizer.encode("packed inputs"), SamplingParams(
        temperature=0.7, top_p=0.9, min_p=0.05, presence_penalty=0.5, logprobs=2,
    ), seed=2**63 + 12345)  # fmt: skip
    sched = Scheduler(engine.serve_cfg, cache_key=engine.cache_key)
    sched.add_request(request)
    inputs = engine._inputs(sched.schedule(), bucket)
    layout = PackedLayout(inputs)
    packed = layout.pack(inputs)
    assert packed.dtype == np.int32 and packed.shape == (layout.size,)
    unpacked = jax.jit(layout.unpack)(packed)
    leaves = jax.tree.leaves(inputs)
    assert (inputs.seeds >= 2**31).any() and (inputs.meta.slot_mapping < 0).any()
    assert inputs.logprobs.dtype == np.bool_ and inputs.logprobs.any()
    for want, got in zip(leaves, jax.tree.leaves(unpacked), strict=True):
        want, got = np.asarray(want), np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_warmup_writes_nothing_to_the_cache(model, tokenizer) -> None:
    eng = JaxEngine.from_model(model, tokenizer, dataclasses.replace(SCFG, max_seqs=2))
    eng.warmup()
    assert not any(np.asarray(pool).any() for pool in (*eng._cache.kv.k, *eng._cache.kv.v))


def test_greedy_matches_model_forward_with_batching(engine, tokenizer, reference_greedy) -> None:
    steps = 12
    requests = [
        (tokenizer.encode(p), SamplingParams(max_tokens=steps, ignore_eos=True)) for p in PROMPTS
    ]  # 5 requests, 4 sequences at a time; 62 prompt tokens: chunked into 32-token steps
    got, _ = _generate(engine, tokenizer, requests)
    for (ids, _), tokens in zip(requests, got, strict=True):
        want, _ = reference_greedy(ids, steps)
        assert tokens == want
    assert len({tuple(t) for t in got}) == len(got)  # outputs differ: the test can fail


def _mixed_requests(tokenizer, shared: str = "") -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(0)
    requests = []
    for i in range(8):
        text = shared + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 14)))
        greedy = i % 2 == 0
        params = SamplingParams(
            max_tokens=rng.randint(4, 14), temperature=0.0 if greedy else 1.0, top_k=0 if
            greedy else 50, seed=None if greedy else 100 + i, ignore_eos=True,
        )  # fmt: skip
        requests.append((tokenizer.encode(text), params))
    return requests


def test_chunked_prefill_gives_the_outputs_of_whole_prefill(engine, tokenizer) -> None:
    requests = _mixed_requests(tokenizer, shared="a prompt that needs chunks ")
    whole, whole_sched = drive(engine, requests)  # every prompt in one step (32 tokens)
    chunked, _ = drive(engine, requests, max_num_batched_tokens=8)  # pieces of <= 8
    assert chunked == whole
    assert max(len(ids) for ids, _ in requests) > 8 and whole_sched.num_preemptions == 0


def test_prefix_caching_on_and_off_give_the_same_outputs(engine, tokenizer) -> None:
    requests = _mixed_requests(tokenizer, shared="You are a helpful assistant. ")  # 30 tokens
    on, on_sched = drive(engine, requests)
    off, off_sched = drive(engine, requests, enable_prefix_caching=False)
    assert on == off
    assert on_sched.kv.prefix_hits >= 4 * 28  # later requests reuse 7 shared pages of 4
    assert off_sched.kv.prefix_hits == 0


def test_preemption_under_exhaustion_loses_nothing(engine, tokenizer) -> None:
    requests = _mixed_requests(tokenizer)
    roomy, roomy_sched = drive(engine, requests)
    tight, tight_sched = drive(engine, requests, kv_cache_tokens=10 * 4)  # 9 usable pages
    assert roomy_sched.num_preemptions == 0 and tight_sched.num_preemptions > 0
    assert tight == roomy


def _ending_requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
    """Sampled requests that end on stop ids within max_tokens, penalized ones, and ones
    whose stop ids min_tokens holds off while a logit_bias makes them all but certain (so
    each ends on exactly its (min_tokens + 1)-th token): what async scheduling must not
    change, beside the greedy and seeded requests of `_mixed_requests`."""
    stops = tuple(range(3, 256, 16))  # 16 ids, the most min_tokens allows
    requests = _mixed_requests(tokenizer)
    for i in range(6):
        held = i % 2 == 1
        params = SamplingParams(
            max_tokens=12, temperature=1.0, seed=200 + i, stop_token_ids=stops,
            min_tokens=2 + i if held else 0,
            logit_bias=tuple((t, 20.0) for t in stops) if held else (),
            presence_penalty=0.5 * (i % 3 == 0), repetition_penalty=1.3 if i % 3 == 2 else 1.0,
        )  # fmt: skip
        requests.append((tokenizer.encode(f"request {i} wants to stop"), params))
    return requests


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_outputs_of_sync(engine, tokenizer, tight) -> None:
    requests = _ending_requests(tokenizer)
    cfg = {"kv_cache_tokens": 10 * 4} if tight else {}  # 9 usable pages of 4
    sync, sync_sched = drive(engine, requests, **cfg)
    ahead, ahead_sched = drive(engine, requests, ahead=True, **cfg)
    assert ahead == sync
    ending = [(out, p) for out, (_, p) in zip(sync, requests, strict=True) if p.stop_token_ids]
    assert any(len(out) < 12 for out, p in ending if not p.min_tokens)  # stop ids ended some
    assert all(len(out) == p.min_tokens + 1 for out, p in ending if p.min_tokens)
    assert (sync_sched.num_preemptions > 0) == (ahead_sched.num_preemptions > 0) == tight


def test_async_scheduling_serving_loop_streams_what_sync_streams(engine, tokenizer) -> None:
    """Through the orchestrator: stop strings (matched on text, after the next step was
    planned), logprobs and finish reasons equal the synchronous loop's."""
    stopping = [
        SamplingParams(max_tokens=10, temperature=0.8, seed=i, logprobs=2, stop=("$", "@"))
        for i in range(len(PROMPTS))
    ]
    requests = [
        (tokenizer.encode(p), params) for p, params in zip(PROMPTS, stopping, strict=True)
    ] + _mixed_requests(tokenizer)

    def run(async_scheduling: bool) -> list[tuple]:
        cfg = dataclasses.replace(engine.serve_cfg, async_scheduling=async_scheduling)
        orch = Orchestrator(engine, cfg)
        results: list[list[Output]] = [[] for _ in requests]
        for (ids, params), sink in zip(requests, results, strict=True):
            orch.submit(ids, params, sink.append)
        for _ in range(500):
            if not orch.step():
                break
        assert orch.scheduler.kv.usage == 0.0 and not orch.scheduler.has_unfinished_requests()
        merged = [merge_outputs(r) for r in results]
        return [
            (m.token_ids, m.text, m.finish_reason, m.matched_stop,
             [(t.token, round(t.logprob, 5)) for t in m.logprobs])
            for m in merged
        ]  # fmt: skip

    sync = run(False)
    assert run(True) == sync
    assert any(matched for _, _, _, matched, _ in sync)  # a stop string ended one


def test_logprobs_match_model(engine, tokenizer, reference_greedy) -> None:
    ids = tokenizer.encode("logprobs")
    _, outs = _generate(
        engine,
        tokenizer,
        [(ids, SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3))],
        neighbours=2,  # neighbours that ask for no logprobs (steps skip them when none do)
    )
    _, logits = reference_greedy(ids, 4)
    steps = [st for o in outs[0] for st in o.logprobs]
    assert len(steps) == 4
    for st, lg in zip(steps, logits, strict=True):
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(lg)))
        assert st.logprob == pytest.approx(float(logp[st.token]), abs=1e-4)
        assert [t for t, _ in st.top] == list(np.argsort(-logp)[:3])
        assert st.top[0][0] == st.token  # greedy picks the top token


def test_no_compile_after_warmup(engine, tokenizer) -> None:
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "ompil" in msg:
                records.append(msg)

    handler = Grab()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            jax.jit(lambda x: x * 3)(np.ones(3))  # the probe itself must be seen
            assert records, "compile logging is not captured; the check below would be void"
            records.clear()
            requests = [
                (
                    tokenizer.encode("x" * n),
                    SamplingParams(
                        max_tokens=5, temperature=t, top_k=k, top_p=p, seed=n, logprobs=lp
                    ),
                )
                for n, t, k, p, lp in [
                    (1, 0.0, 0, 1.0, 0),
                    (9, 0.7, 5, 0.9, 2),
                    (20, 1.3, 0, 0.5, 5),
                    (40, 1.0, 1, 1.0, 1),
                ]
            ]  # fmt: skip  (steps of every bucket: 1-3 decode rows, chunks, a full step)
            _generate(engine, tokenizer, requests, neighbours=3)
            drive(engine, requests, kv_cache_tokens=14 * 4)  # with preemptions
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert records == []


def test_seeded_sampling_independent_of_batch(engine, tokenizer) -> None:
    ids = tokenizer.encode("seeded request")
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, top_p=0.95, seed=1234)
    alone, _ = _generate(engine, tokenizer, [(ids, params)])
    crowded, _ = _generate(engine, tokenizer, [(ids, params)], neighbours=3)
    assert alone == crowded
    other_seed, _ = _generate(
        engine, tokenizer, [(ids, SamplingParams(max_tokens=10, temperature=1.0, seed=99))]
    )
    assert other_seed != alone  # the seed matters


def test_top_k_one_is_greedy(engine, tokenizer) -> None:
    ids = tokenizer.encode("k1")
    greedy, _ = _generate(engine, tokenizer, [(ids, SamplingParams(max_tokens=8, ignore_eos=True))])
    k1, _ = _generate(
        engine,
        tokenizer,
        [(ids, SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=5, ignore_eos=True))],
    )
    assert k1 == greedy


def test_kv_cache_size_derived_on_cpu(engine) -> None:
    # CPU: room for max_seqs sequences of max_len (what a slot engine reserved), plus the
    # null page; SCFG leaves kv_cache_tokens at 0
    scfg = engine.serve_cfg
    assert SCFG.kv_cache_tokens == 0
    assert scfg.kv_cache_tokens == 4 * 64 + 4 and scfg.num_pages == 65
    assert kv_bytes_per_token(CFG, jnp.float32) == 2 * 2 * 2 * 16 * 4
    explicit = JaxEngine.from_model(
        Transformer(CFG, rngs=nnx.Rngs(0)), engine.tokenizer,
        dataclasses.replace(SCFG, kv_cache_tokens=40),
    )  # fmt: skip
    assert explicit.serve_cfg.kv_cache_tokens == 40
    # or in GiB of memory per device: 0.0001 GiB / 512 bytes a token, whole pages
    by_memory = JaxEngine.from_model(
        Transformer(CFG, rngs=nnx.Rngs(0)), engine.tokenizer,
        dataclasses.replace(SCFG, kv_cache_memory=0.0001),
    )  # fmt: skip
    page = by_memory.serve_cfg.page_size
    assert by_memory.serve_cfg.kv_cache_tokens == int(0.0001 * 2**30) // 512 // page * page
    with pytest.raises(ValueError, match="kv_cache_memory=1e-06"):  # under 2 pages
        JaxEngine.from_model(
            Transformer(CFG, rngs=nnx.Rngs(0)), engine.tokenizer,
            dataclasses.replace(SCFG, kv_cache_memory=1e-6),
        )  # fmt: skip
    with pytest.raises(ValueError, match="kv_cache_memory"):  # one size, not two
        dataclasses.replace(SCFG, kv_cache_memory=1.0, kv_cache_tokens=64)
    # a size asked for that could never be allocated: named at start-up, not a MemoryError
    for field, value in [("kv_cache_memory", 100_000.0), ("kv_cache_tokens", 2**44)]:
        with pytest.raises(ValueError, match=rf"^{field}={value} is invalid: .* host memory"):
            JaxEngine.from_model(
                Transformer(CFG, rngs=nnx.Rngs(0)), engine.tokenizer,
                dataclasses.replace(SCFG, **{field: value}),
            )  # fmt: skip


def test_a_bfloat16_model_gets_a_float32_cache_on_cpu(tokenizer, caplog) -> None:
    """On CPU the pages default to float32 whatever the model computes in (the engine's
    `default_cache_dtype`); asking for a bfloat16 one anyway works, with a warning. Both
    pools hold a bfloat16 model's K/V exactly and the prompt chunks attend in float32 in
    both, so these short greedy requests agree; the decode rows do not round alike (a
    bfloat16 pool's weigh V in bfloat16), so longer ones may part at a near tie."""
    bf16 = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16")
    model = Transformer(bf16, rngs=nnx.Rngs(0))
    one_bucket = dataclasses.replace(SCFG, max_num_batched_tokens=8)  # one compile each
    default = JaxEngine.from_model(model, tokenizer, one_bucket)
    assert default.serve_cfg.cache_dtype == "float32"
    with caplog.at_level(logging.WARNING, logger="tandem.serve.engine"):
        asked = JaxEngine.from_model(
            model, tokenizer, dataclasses.replace(one_bucket, cache_dtype="bfloat16")
        )
    assert asked.serve_cfg.cache_dtype == "bfloat16"
    assert "cache_dtype=bfloat16 on CPU" in caplog.text
    assert default.cache_key != asked.cache_key  # their pages are not interchangeable
    default.warmup()
    asked.warmup()
    greedy = [(ids, p) for ids, p in _mixed_requests(tokenizer) if p.temperature == 0]
    assert drive(default, greedy)[0] == drive(asked, greedy)[0]


def test_pick_tensor_parallel() -> None:
    assert pick_tensor_parallel(CFG, 8) == 2  # kv heads = 2
    assert pick_tensor_parallel(CFG, 1) == 1
    assert pick_tensor_parallel(CFG, 3) == 1
    with pytest.raises(ValueError, match="tensor_parallel"):
        pick_tensor_parallel(CFG, 2, requested=4)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs >= 2 (simulated) devices")
def test_tensor_parallel_matches_single_device(model, engine, tokenizer) -> None:
    tp_engine = JaxEngine.from_model(model, tokenizer, dataclasses.replace(SCFG, tensor_parallel=0))
    tp_engine.warmup()
    assert tp_engine.tensor_parallel == 2
    wq = tp_engine.layer_weights[0]["wq"]
    assert len(wq.sharding.device_set) == 2  # really sharded
    requests = _mixed_requests(tokenizer, shared="shared prefix ")
    assert drive(tp_engine, requests)[0] == drive(engine, requests)[0]


def test_int8_bundle_serves_its_own_greedy(model, tokenizer, tmp_path) -> None:
    """An int8 bundle (tandem/model/quant.py) is served as is: greedy equals the quantized model's
    own forward, loaded from the same bundle."""
    from tandem.model.bundle import Bundle, flat_params, write_bundle
    from tandem.model.quant import quantize_tensors

    tensors = quantize_tensors(flat_params(nnx.state(model, nnx.Param)))
    qcfg = dataclasses.replace(CFG, quantization="int8")
    path = write_bundle(tmp_path / "q", qcfg, tokenizer, tensors, source={}, quantization="int8")
    eng = JaxEngine.from_bundle(
        path, ServeConfig(max_seqs=2, max_num_batched_tokens=16, tensor_parallel=1)
    )
    eng.warmup()
    reference = greedy_reference(Bundle.load(path).model())
    requests = [
        (tokenizer.encode(p), SamplingParams(max_tokens=8, ignore_eos=True)) for p in ("int8", "q!")
    ]
    got, _ = _generate(eng, tokenizer, requests)
    for (ids, _), tokens in zip(requests, got, strict=True):
        assert tokens == reference(ids, 8)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_m_serve_bundle_end_to_end(model, tokenizer, tmp_path, reference_greedy) -> None:
    """`python -m tandem.serve --bundle` on a bundle from tandem/model/bundle.py: health, a greedy
    stream equal to the model's own decode, metrics, SIGTERM drains and exits 0."""
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem.model.bundle import flat_params, write_bundle
    from tandem.serve.client import TandemClient

    _, params = nnx.split(model, nnx.Param)
    bundle = write_bundle(
        tmp_path / "bundle", CFG, tokenizer, flat_params(params), source={"test": "serve"}
    )
    port, mport = _free_port(), _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": on_devices(1)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.serve", "--bundle", str(bundle), "--port", str(port),
         "--metrics-port", str(mport), "--max-slots", "2", "--max-len", "48",
         "--max-prompt-len", "32", "--page-size", "8", "--max-num-batched-tokens", "16"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health.Check(
                    health_pb2.HealthCheckRequest(service="tandem.v1.Generation"), timeout=2
                ).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, proc.stdout.read()
        client = TandemClient(f"127.0.0.1:{port}")
        prompts = ["bundle one", "two"]
        calls = [client.generate(p, max_tokens=6, ignore_eos=True) for p in prompts]
        for p, call in zip(prompts, calls, strict=True):
            tokens = [t for r in call for t in r.token_ids]
            want, _ = reference_greedy(tokenizer.encode(p), 6)
            assert tokens == want
        again = list(client.generate("bundle one", max_tokens=2, ignore_eos=True))
        assert again[-1].usage.cached_prompt_tokens == 8  # one full page of 8 was cached
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        for line in (
            b"tandem_active_slots 0.0",
            b"tandem_prefix_cache_hits_total 8.0",
            b"tandem_kv_cache_usage_ratio 0.0",
            b"tandem_preemptions_total 0.0",
        ):
            assert line in body, line  # fmt: skip
        inflight = client.generate("drain", max_tokens=10, ignore_eos=True)
        first = next(inflight)
        proc.send_signal(signal.SIGTERM)
        rest = list(inflight)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 10
        assert rest[-1].finish_reason == "length"
        assert proc.wait(timeout=60) == 0
        client.close()
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
