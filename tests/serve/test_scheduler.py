"""The token-budget scheduler, run against a fake model that really uses the plan.

`PagedFakeModel` keeps a simulated paged cache: each step it writes every new token's
"K/V" (a hash chained over the sequence up to that position) to `slot_mapping`, checks the
plan's positions and slots against the page table, and picks each sampled row's next token
from ALL the values the row reads through `page_indices` up to `kv_lens`, as attention
would. `reference()` generates the same requests one token at a time from their token
lists alone, with no pages, batching or scheduler: any wrong page, slot, position, shared
prefix or lost token changes a request's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random

import numpy as np
import pytest

from tandem.serve.config import ServeConfig
from tandem.serve.output_buffer import OutputBuffer
from tandem.serve.sampling import SamplingParams
from tandem.serve.scheduler import (
    FinishReason,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerOutput,
    check_stop,
)

VOCAB, EOS = 50, 0


def _digest(*parts: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"|".join(parts), digest_size=8).digest(), "little")


def mix(prev: int, token: int, position: int) -> int:
    """The fake K/V of `token` at `position` after the K/V `prev` (chained: it depends on
    the whole prefix, as a deep model's K/V do)."""
    return _digest(b"%d,%d,%d" % (prev, token, position))


def next_token(values: np.ndarray, seed: int, position: int) -> int:
    """The fake model's sample from the values a row attends to (all of them)."""
    return _digest(values.astype(np.uint64).tobytes(), b"%d,%d" % (seed, position)) % VOCAB


def reference(prompt: list[int], sampling: SamplingParams, seed: int, max_len: int) -> list[int]:
    """Greedy generation from the token list alone: what every schedule must reproduce."""
    tokens, values, out = list(prompt), [], []
    prev = 0
    for pos, tok in enumerate(tokens):
        prev = mix(prev, tok, pos)
        values.append(prev)
    stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else {EOS})
    while True:
        tok = next_token(np.array(values, np.uint64), seed, len(tokens))
        out.append(tok)
        if tok in stop or len(out) >= sampling.max_tokens or len(tokens) + 1 >= max_len:
            return out
        prev = mix(prev, tok, len(tokens))
        values.append(prev)
        tokens.append(tok)


class PagedFakeModel:
    def __init__(self, cfg: ServeConfig) -> None:
        self.page_size = cfg.page_size
        self.cache = np.zeros(cfg.num_pages * cfg.page_size, np.uint64)  # one value a slot
        self.sampled = np.zeros(cfg.max_seqs, np.int64)  # the last run's, as the engine keeps

    def run(self, plan: SchedulerOutput) -> np.ndarray:  # [R] sampled tokens
        ps = self.page_size
        assert plan.token_ids.dtype == plan.slot_mapping.dtype == np.int32
        assert plan.page_indices.shape[0] == plan.num_rows
        sampled = np.full(plan.num_rows, -1, np.int64)
        for r, request in enumerate(plan.requests):
            lo, hi = int(plan.cu_q_lens[r]), int(plan.cu_q_lens[r + 1])
            start, end = int(plan.num_computed_tokens[r]), int(plan.kv_lens[r])
            assert hi - lo == end - start >= 1
            table = plan.page_indices[r]
            used = -(-end // ps)
            assert (table[used:] == 0).all() and (table[:used] != 0).all()
            pos = np.arange(start, end)
            assert (plan.positions[lo:hi] == pos).all()
            assert (plan.slot_mapping[lo:hi] == table[pos // ps] * ps + pos % ps).all()
            prev = int(self.cache[table[(start - 1) // ps] * ps + (start - 1) % ps]) if start else 0
            for t in range(lo, hi):
                src = int(plan.token_sources[t])  # async scheduling: the last run's sample
                token = int(self.sampled[src]) if src >= 0 else int(plan.token_ids[t])
                prev = mix(prev, token, int(plan.positions[t]))
                self.cache[plan.slot_mapping[t]] = prev
            if plan.sample[r]:
                every = np.arange(end)
                values = self.cache[table[every // ps] * ps + every % ps]
                sampled[r] = next_token(values, request.seed, end)
        self.sampled[: plan.num_rows] = sampled
        return sampled


@dataclasses.dataclass
class Spec:
    prompt: list[int]
    max_tokens: int
    arrival: int = 0  # step at which it is submitted
    seed: int = 0


@dataclasses.dataclass
class Run:
    outputs: dict[str, list[int]]
    finish: dict[str, FinishReason]
    plans: list[SchedulerOutput]
    scheduler: Scheduler

    @property
    def computed_tokens(self) -> int:
        return sum(p.num_tokens for p in self.plans)


def serve_cfg(**kw) -> ServeConfig:
    kw.setdefault("max_len", 256)
    kw.setdefault("page_size", 4)
    kw.setdefault("kv_cache_tokens", 4096)
    kw.setdefault("max_seqs", 8)
    kw.setdefault("max_num_batched_tokens", 64)
    return ServeConfig(**kw)


def make_request(rid: str, spec: Spec) -> Request:
    return Request(
        rid, spec.prompt, SamplingParams(max_tokens=spec.max_tokens), seed=spec.seed,
        eos_token_ids=(EOS,),
    )  # fmt: skip


def simulate(
    cfg: ServeConfig, specs: dict[str, Spec], *, ahead: bool = False, max_steps: int = 10_000
) -> Run:
    """Runs the requests to the end; `ahead`: async scheduling's order (each step planned
    and run before the previous one is committed)."""
    sched = Scheduler(cfg)
    model = PagedFakeModel(cfg)
    outputs: dict[str, list[int]] = {rid: [] for rid in specs}
    finish: dict[str, FinishReason] = {}
    plans = []
    in_flight = None
    for step in range(max_steps):
        for rid, spec in specs.items():
            if spec.arrival == step:
                sched.add_request(make_request(rid, spec))
        running_before = {r.request_id for r in sched.running}
        plan = sched.schedule()
        assert plan.num_tokens <= cfg.max_num_batched_tokens
        assert plan.num_rows <= cfg.max_seqs
        if plan.preempted:  # a step that preempts admits nobody new
            assert {r.request_id for r in plan.requests} <= running_before
        check_pages_not_shared_while_written(sched, plan)
        for r in plan.requests:  # no step past a request's end, even one planned ahead
            assert r.num_output_tokens + r.num_output_placeholders <= r.max_tokens, r
        done = (plan, model.run(plan)) if plan.num_rows else None
        if ahead:
            done, in_flight = in_flight, done
        if done is not None:
            plans.append(done[0])
            for out in sched.update_from_output(*done):
                outputs[out.request.request_id].append(out.token)
                if out.finish_reason is not None:
                    finish[out.request.request_id] = out.finish_reason
        if len(finish) == len(specs):
            break
    else:
        raise AssertionError("the simulation did not finish")
    assert not sched.has_unfinished_requests()
    assert sched.kv.usage == 0.0  # nothing leaked
    return Run(outputs, finish, plans, sched)


def check_pages_not_shared_while_written(sched: Scheduler, plan: SchedulerOutput) -> None:
    """A page another running sequence holds is never written by this step."""
    ps = sched.page_size
    written = set((plan.slot_mapping // ps).tolist())
    for r in sched.running:
        pages = sched.kv.pages_of(r.request_id)
        for p in written & set(pages):
            assert sched.kv.ref_count(p) == 1, (r, p)


def check_against_reference(run: Run, specs: dict[str, Spec], max_len: int) -> None:
    for rid, spec in specs.items():
        sampling = SamplingParams(max_tokens=spec.max_tokens)
        assert run.outputs[rid] == reference(spec.prompt, sampling, spec.seed, max_len), rid


def random_specs(rng: random.Random, n: int, *, prompt=(5, 40), out=(5, 60), arrivals=20):
    return {
        f"r{i}": Spec(
            [rng.randrange(1, VOCAB) for _ in range(rng.randint(*prompt))],
            rng.randint(*out),
            arrival=rng.randrange(arrivals),
            seed=rng.randrange(1 << 30),
        )
        for i in range(n)
    }


# ---- correctness under memory pressure, prefix caching, chunking -------------------------


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", range(3))
def test_preemption_under_exhaustion_loses_nothing(seed: int, ahead: bool) -> None:
    """A pool far smaller than the load: requests are preempted and recomputed, and every
    one produces exactly what an unconstrained run produces (also with async scheduling:
    a request preempted, ended or finished while its next step is in flight)."""
    specs = random_specs(random.Random(seed), 16)
    roomy = simulate(serve_cfg(), specs, ahead=ahead)
    tight = simulate(serve_cfg(kv_cache_tokens=25 * 4), specs, ahead=ahead)  # 24 pages of 4
    assert roomy.scheduler.num_preemptions == 0
    assert tight.scheduler.num_preemptions > 0
    assert tight.outputs == roomy.outputs and tight.finish == roomy.finish
    check_against_reference(tight, specs, 256)
    # the prefix-cache counters count each request's prompt once: a preempted request
    # finding its own pages again is no hit (vLLM counts those apart)
    assert tight.scheduler.kv.prefix_queries == sum(len(s.prompt) for s in specs.values())
    assert set(roomy.finish.values()) == {FinishReason.STOP, FinishReason.LENGTH}


def test_prefix_caching_on_and_off_give_the_same_outputs() -> None:
    rng = random.Random(7)
    system = [rng.randrange(1, VOCAB) for _ in range(40)]  # a shared system prompt
    specs = {
        f"r{i}": Spec(system + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 9))],
                      rng.randint(3, 20), arrival=2 * i, seed=i)
        for i in range(10)
    }  # fmt: skip
    on = simulate(serve_cfg(), specs)
    off = simulate(serve_cfg(enable_prefix_caching=False), specs)
    assert on.outputs == off.outputs
    check_against_reference(on, specs, 256)
    kv = on.scheduler.kv
    assert kv.prefix_hits >= 9 * 40  # every later request reuses the 10 full system pages
    assert kv.prefix_queries == sum(len(s.prompt) for s in specs.values())
    assert off.scheduler.kv.prefix_hits == off.scheduler.kv.prefix_queries == 0
    assert on.computed_tokens == off.computed_tokens - kv.prefix_hits


def test_cached_prompt_tokens_are_reported_per_request() -> None:
    cfg = serve_cfg()
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    prompt = list(range(1, 19))  # 18 tokens: 4 full pages of 4
    first = make_request("a", Spec(prompt, 1))
    sched.add_request(first)
    plan = sched.schedule()
    sched.update_from_output(plan, model.run(plan))
    second = make_request("b", Spec(prompt, 1))
    sched.add_request(second)
    plan = sched.schedule()
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 16)
    assert plan.num_tokens == 2 and int(plan.num_computed_tokens[0]) == 16


def test_a_prompt_logprobs_request_computes_its_whole_prompt_and_is_no_prefix_query() -> None:
    """Positions served from the cache would have no logprobs, so a scored prompt skips the
    lookup; the hit-rate counters then leave it out (as vLLM's do), while the pages it
    computes still serve the requests after it."""
    cfg = serve_cfg()
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    prompt = list(range(1, 19))  # 18 tokens: 4 full pages of 4
    scored = [
        Request(rid, prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), seed=0)
        for rid in ("s1", "s2")
    ]
    for request in scored:
        sched.add_request(request)
        plan = sched.schedule()
        assert plan.num_tokens == len(prompt)
        sched.update_from_output(plan, model.run(plan))
    assert [r.num_cached_tokens for r in scored] == [0, 0]
    assert (sched.kv.prefix_queries, sched.kv.prefix_hits) == (0, 0)
    plain = make_request("p", Spec(prompt, 1))
    sched.add_request(plain)
    sched.schedule()
    assert plain.num_cached_tokens == 16
    assert (sched.kv.prefix_queries, sched.kv.prefix_hits) == (len(prompt), 16)


def test_requests_arriving_together_with_one_prompt_compute_it_once() -> None:
    """The n choices of a prompt (or a burst sharing a system prompt): the first computes
    the shared full pages, the others wait for them to be published and then start after
    them; outputs are what each would produce alone."""
    rng = random.Random(11)
    prompt = [rng.randrange(1, VOCAB) for _ in range(42)]  # 10 full pages of 4, then 2
    specs = {f"c{i}": Spec(prompt, 12, seed=100 + i) for i in range(4)}
    specs["other"] = Spec([rng.randrange(1, VOCAB) for _ in range(9)], 12, seed=5)
    on = simulate(serve_cfg(), specs)
    check_against_reference(on, specs, 256)
    first = on.plans[0]
    assert [r.request_id for r in first.requests] == ["c0", "other"]  # siblings wait, others not
    shared = 40  # (42 - 1) // 4 full pages
    assert on.scheduler.kv.prefix_hits == 3 * shared
    off = simulate(serve_cfg(enable_prefix_caching=False), specs)
    assert on.outputs == off.outputs
    assert on.computed_tokens == off.computed_tokens - 3 * shared


def test_a_waiting_sibling_follows_a_chunked_prefill_page_by_page() -> None:
    """A prompt longer than the budget: its sibling waits while the first computes it in
    chunks, then reuses every published page; a later unrelated request is not held up."""
    cfg = serve_cfg(max_num_batched_tokens=16)
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    prompt = list(range(1, 41))  # 40 tokens: 3 steps of 16
    a, b = make_request("a", Spec(prompt, 2)), make_request("b", Spec(prompt, 2))
    c = make_request("c", Spec([7, 8, 9], 2))
    for request in (a, b, c):
        sched.add_request(request)
    admitted = []
    while b.status == RequestStatus.WAITING:
        plan = sched.schedule()
        admitted.append([r.request_id for r in plan.requests])
        sched.update_from_output(plan, model.run(plan))
    # a's chunks fill the first two steps; in the third, b still waits for a's last
    # page but c, behind it in the queue, starts; b starts after it
    assert admitted == [["a"], ["a"], ["a", "c"], ["a", "c", "b"]]
    assert b.num_cached_tokens == 36  # (40 - 1) // 4 full pages, all computed by a


def test_a_waiting_sibling_keeps_its_seat_when_the_running_set_is_full() -> None:
    """With max_seqs seats, a request waiting for its sibling's pages holds its seat: the
    later request c may not take it (b would then wait for c's whole generation, later
    than without prefix caching)."""

    def first_token_steps(enable_prefix_caching: bool) -> dict[str, int]:
        cfg = serve_cfg(max_seqs=2, max_num_batched_tokens=16,
                        enable_prefix_caching=enable_prefix_caching)  # fmt: skip
        sched, model = Scheduler(cfg), PagedFakeModel(cfg)
        prompt = list(range(1, 41))  # 40 tokens: 3 steps of 16
        for rid, spec in [("a", Spec(prompt, 50, seed=1)), ("b", Spec(prompt, 50, seed=2)),
                          ("c", Spec([7, 8, 9], 50, seed=3))]:  # fmt: skip
            request = make_request(rid, spec)
            request.stop_token_ids = frozenset()  # each runs to max_tokens
            sched.add_request(request)
        first: dict[str, int] = {}
        for step in itertools.count():
            plan = sched.schedule()
            for out in sched.update_from_output(plan, model.run(plan)):
                first.setdefault(out.request.request_id, step)
            if not sched.has_unfinished_requests():
                return first
            assert step < 500

    off, on = first_token_steps(False), first_token_steps(True)
    assert off["b"] < off["c"]
    assert on["b"] <= off["b"] and on["b"] < on["c"], (on, off)


def test_a_long_prompt_is_chunked_while_16_streams_keep_decoding() -> None:
    cfg = serve_cfg(max_len=2100, kv_cache_tokens=8192, max_seqs=32, max_num_batched_tokens=256)
    rng = random.Random(3)
    specs = {
        f"d{i}": Spec([rng.randrange(1, VOCAB) for _ in range(8)], 60, seed=i) for i in range(16)
    }
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    outputs: dict[str, list[int]] = {rid: [] for rid in specs}
    for rid, spec in specs.items():
        sched.add_request(make_request(rid, spec))

    def step() -> SchedulerOutput:
        plan = sched.schedule()
        for out in sched.update_from_output(plan, model.run(plan)):
            outputs[out.request.request_id].append(out.token)
        return plan

    first = step()
    assert first.num_rows == 16  # 16 short prompts share one step
    step()
    decoding = {r.request_id for r in sched.running}
    long_spec = Spec([rng.randrange(1, VOCAB) for _ in range(2000)], 5, seed=99)
    outputs["long"] = []
    sched.add_request(make_request("long", long_spec))
    chunks = []
    while not outputs["long"]:
        streams = decoding & {r.request_id for r in sched.running}  # those not ended yet
        plan = step()
        rows = {r.request_id: int(plan.cu_q_lens[i + 1] - plan.cu_q_lens[i])
                for i, r in enumerate(plan.requests)}  # fmt: skip
        chunks.append(rows["long"])
        assert all(rows.get(rid) == 1 for rid in streams)  # every stream got its token
        assert plan.num_tokens <= 256
    assert sum(chunks) == 2000 and len(chunks) >= 2000 // 256 + 1
    assert chunks[0] == 256 - len(decoding)  # the chunk takes what the decodes leave
    while sched.has_unfinished_requests():
        step()
    specs["long"] = long_spec
    for rid, spec in specs.items():
        assert outputs[rid] == reference(spec.prompt, SamplingParams(max_tokens=spec.max_tokens),
                                         spec.seed, cfg.max_len), rid  # fmt: skip


def test_random_soak_with_aborts_leaks_no_page() -> None:
    rng = random.Random(11)
    cfg = serve_cfg(kv_cache_tokens=30 * 4, max_seqs=6, max_num_batched_tokens=24)
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    specs = random_specs(rng, 80, arrivals=300)
    aborted = set()
    for step in range(2000):
        for rid, spec in specs.items():
            if spec.arrival == step:
                sched.add_request(make_request(rid, spec))
        if sched.requests and rng.random() < 0.15:
            rid = rng.choice(list(sched.requests))  # waiting, running or preempted
            assert [r.request_id for r in sched.finish_requests([rid])] == [rid]
            aborted.add(rid)
        plan = sched.schedule()
        if plan.num_rows:
            if rng.random() < 0.1 and sched.running:  # a cancel between plan and output
                victim = rng.choice(plan.requests)
                sched.finish_requests([victim.request_id])
                aborted.add(victim.request_id)
            sched.update_from_output(plan, model.run(plan))
        if step > 300 and not sched.has_unfinished_requests():
            break
    assert aborted and not sched.has_unfinished_requests() and sched.num_preemptions > 0
    assert sched.kv.usage == 0.0 and sched.kv.num_free_pages == sched.kv.num_usable_pages
    assert all(sched.kv.ref_count(p) == 0 for p in range(sched.kv.num_pages))


class _AnyToken:
    """A grammar that accepts every token and never finishes."""

    finished = False

    def accept(self, token: int) -> bool:
        return True


def test_a_step_planned_ahead_reads_its_decode_tokens_from_the_step_before() -> None:
    """Async scheduling's order: a step planned before the previous one is committed takes
    each sampled-but-uncommitted token from that step's row (token_sources), and plans
    nothing past max_tokens nor for a grammar (its bitmask needs the token)."""
    sched = Scheduler(serve_cfg())
    free = make_request("free", Spec([5, 6, 7], max_tokens=4))
    last = make_request("last", Spec([8, 9], max_tokens=1))
    grammar = Request("grammar", [5, 6], SamplingParams(max_tokens=4), seed=0, grammar=_AnyToken())
    for request in (free, last, grammar):
        sched.add_request(request)
    first = sched.schedule()
    assert [r.request_id for r in first.requests] == ["free", "last", "grammar"]
    assert (first.token_sources == -1).all() and first.sample.all()
    ahead = sched.schedule()  # before `first` is committed
    assert [r.request_id for r in ahead.requests] == ["free"]
    assert ahead.token_sources.tolist() == [0] and ahead.positions.tolist() == [3]
    outputs = sched.update_from_output(first, np.array([11, 12, 13]))
    assert [(o.request.request_id, o.token, o.finish_reason) for o in outputs] == [
        ("free", 11, None), ("last", 12, FinishReason.LENGTH), ("grammar", 13, None)
    ]  # fmt: skip
    assert free.output_token_ids == [11] and free.num_output_placeholders == 1
    after = sched.schedule()  # `ahead` still in flight: free continues from its row 0
    assert [r.request_id for r in after.requests] == ["free", "grammar"]
    assert after.token_sources.tolist() == [0, -1] and after.token_ids[1] == 13


# ---- the plan, admission and limits ------------------------------------------------------


def test_the_plan_arrays_for_a_decode_and_a_chunk() -> None:
    cfg = serve_cfg(page_size=4, max_num_batched_tokens=8)
    sched = Scheduler(cfg)
    sched.add_request(make_request("a", Spec([1, 2, 3, 4, 5], 4)))
    plan = sched.schedule()  # a: the whole prompt, pages 1, 2
    sched.update_from_output(plan, [7])
    sched.add_request(make_request("b", Spec(list(range(10, 20)), 4)))
    plan = sched.schedule()  # a decodes token 7 at position 5; b gets a 7-token chunk
    assert [r.request_id for r in plan.requests] == ["a", "b"]
    np.testing.assert_array_equal(plan.token_ids, [7, 10, 11, 12, 13, 14, 15, 16])
    np.testing.assert_array_equal(plan.positions, [5, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(plan.cu_q_lens, [0, 1, 8])
    np.testing.assert_array_equal(plan.num_computed_tokens, [5, 0])
    np.testing.assert_array_equal(plan.kv_lens, [6, 7])
    np.testing.assert_array_equal(plan.page_indices, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(plan.slot_mapping, [9, 12, 13, 14, 15, 16, 17, 18])
    np.testing.assert_array_equal(plan.sample, [True, False])  # b's prompt is not done
    np.testing.assert_array_equal(plan.logits_indices, [0, 7])
    outs = sched.update_from_output(plan, [8, 99])
    assert [(o.request.request_id, o.row, o.token) for o in outs] == [("a", 0, 8)]
    assert sched.requests["b"].output_token_ids == []


def test_a_step_that_preempts_frees_the_newest_and_requeues_it_first() -> None:
    cfg = serve_cfg(page_size=4, kv_cache_tokens=4 * 4, max_num_batched_tokens=16)  # 3 pages
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    sched.add_request(make_request("old", Spec([1, 2, 3, 4], 8)))
    sched.add_request(make_request("new", Spec([5, 6, 7, 8], 8)))
    sched.add_request(make_request("next", Spec([9], 2)))
    plan = sched.schedule()  # both prompts: 2 pages; "next" takes the third
    assert [r.request_id for r in plan.requests] == ["old", "new", "next"]
    sched.update_from_output(plan, model.run(plan))
    # old needs a second page and none is left: the newest ("next") goes; then new needs
    # one too and is itself the newest left
    plan = sched.schedule()
    assert [r.request_id for r in plan.preempted] == ["next", "new"]
    assert [r.request_id for r in plan.requests] == ["old"]
    assert [r.request_id for r in sched.waiting] == ["new", "next"]  # oldest first
    for rid in ("new", "next"):
        req = sched.requests[rid]
        assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens == 0
        assert sched.kv.pages_of(rid) == [] and req.num_preemptions == 1
    assert len(sched.kv.pages_of("old")) == 2


def test_static_admission_runs_one_batch_until_its_last_member_ends() -> None:
    now = [0.0]
    cfg = serve_cfg(mode="static", max_seqs=2, static_batch_wait_s=1.0)
    sched, model = Scheduler(cfg, clock=lambda: now[0]), PagedFakeModel(cfg)
    sched.add_request(make_request("a", Spec([1, 2, 3], 1)))
    assert not sched.ready() and sched.schedule().num_rows == 0  # waits to fill the batch
    now[0] = 1.0
    assert sched.ready()
    now[0] = 0.5
    sched.add_request(make_request("b", Spec([4, 5, 6], 6)))  # the batch is full: go
    sched.add_request(make_request("c", Spec([7, 8], 2)))
    plan = sched.schedule()
    assert [r.request_id for r in plan.requests] == ["a", "b"]
    sched.update_from_output(plan, model.run(plan))  # a ends (max_tokens 1)
    while "b" in sched.requests:
        plan = sched.schedule()
        assert [r.request_id for r in plan.requests] == ["b"]  # c waits for the batch
        sched.update_from_output(plan, model.run(plan))
    now[0] = 10.0
    plan = sched.schedule()
    assert [r.request_id for r in plan.requests] == ["c"]


def test_a_static_batch_sharing_a_prompt_starts_together() -> None:
    """A static batch's members compute a shared prompt each rather than wait for the
    first (which would run them one after another and skew the baseline)."""
    cfg = serve_cfg(mode="static", max_seqs=4, static_batch_wait_s=0.0)
    specs = {f"c{i}": Spec(list(range(1, 14)), 3, seed=i) for i in range(4)}  # 3 full pages
    run = simulate(cfg, specs)
    assert sorted(r.request_id for r in run.plans[0].requests) == sorted(specs)
    check_against_reference(run, specs, cfg.max_len)


def test_static_admission_starts_a_partial_batch_when_draining() -> None:
    cfg = serve_cfg(mode="static", max_seqs=4, static_batch_wait_s=100.0)
    sched = Scheduler(cfg, clock=lambda: 0.0)
    sched.add_request(make_request("a", Spec([1, 2, 3], 2)))
    assert sched.schedule().num_rows == 0
    sched.draining = True
    assert sched.schedule().num_rows == 1


def test_continuous_admission_honours_max_prefills_per_step_and_max_seqs() -> None:
    sched = Scheduler(serve_cfg(max_prefills_per_step=2, max_seqs=3))
    for i in range(5):
        sched.add_request(make_request(f"r{i}", Spec([1, 2, 3], 10)))
    assert sched.schedule().num_rows == 2
    assert sched.num_running == 2 and sched.num_waiting == 3


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "cfg_kw", "message"),
    [
        (0, 4, {}, "prompt_token_ids='[]' is invalid"),
        (30, 4, {"max_len": 32}, "max_tokens=4 is invalid: allowed <= 2"),
        (32, 1, {"max_len": 32}, "at most max_prompt_len=31 tokens"),
        (10, 40, {"kv_cache_tokens": 12 * 4}, "must fit the whole KV cache (11 pages of 4"),
        (
            45,
            1,
            {"kv_cache_tokens": 12 * 4},
            "prompt_token_ids='<45 tokens>' is invalid: "
            "allowed at most 44 tokens with max_tokens 1: the whole KV cache (11 pages of 4",
        ),
    ],
    ids=["empty", "max_len", "prompt", "pool", "prompt_past_pool"],
)
def test_requests_that_can_never_fit_are_rejected_up_front(
    prompt_len: int, max_tokens: int, cfg_kw: dict, message: str
) -> None:
    sched = Scheduler(serve_cfg(**cfg_kw))
    with pytest.raises(ValueError) as err:
        sched.add_request(make_request("a", Spec([1] * prompt_len, max_tokens)))
    assert message in str(err.value)
    assert not sched.has_unfinished_requests()


def test_the_largest_request_the_pool_can_hold_is_accepted_and_runs() -> None:
    cfg = serve_cfg(kv_cache_tokens=12 * 4)  # 44 positions: prompt 10 + 35 tokens
    spec = {"a": Spec([3] * 10, 35, seed=5)}
    run = simulate(cfg, spec)
    check_against_reference(run, spec, cfg.max_len)


def test_a_duplicate_request_id_is_rejected() -> None:
    sched = Scheduler(serve_cfg())
    sched.add_request(make_request("a", Spec([1], 2)))
    with pytest.raises(ValueError, match="request_id='a' is invalid"):
        sched.add_request(make_request("a", Spec([1], 2)))


def test_the_scheduler_needs_resolved_sizes() -> None:
    with pytest.raises(ValueError, match="max_len=0 is invalid"):
        Scheduler(ServeConfig(kv_cache_tokens=64))
    with pytest.raises(ValueError, match="kv_cache_tokens=0 is invalid"):
        Scheduler(ServeConfig(max_len=64))
    with pytest.raises(ValueError, match="page_size=0 is invalid"):
        Scheduler(ServeConfig(max_len=64, kv_cache_tokens=64))  # page size: the engine's


def test_a_stop_string_ends_a_running_request_and_frees_its_pages() -> None:
    cfg = serve_cfg()
    sched, model = Scheduler(cfg), PagedFakeModel(cfg)
    sched.add_request(make_request("a", Spec(list(range(1, 20)), 30)))
    plan = sched.schedule()
    sched.update_from_output(plan, model.run(plan))
    assert sched.kv.usage > 0
    [req] = sched.finish_requests(["a", "unknown"], FinishReason.STOP)
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.status.finish_reason == FinishReason.STOP and req.status.finished
    assert sched.kv.usage == 0.0 and sched.finish_requests(["a"]) == []


# ---- check_stop -------------------------------------------------------------------------


def _with_output(outputs: list[int], **params) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams(**params), seed=0, eos_token_ids=(0, 2))
    for t in outputs:
        req.append_output_token(t)
    return req


@pytest.mark.parametrize(
    ("outputs", "params", "max_len", "expected"),
    [
        ([5], {"max_tokens": 4}, 100, None),
        ([0], {"max_tokens": 4}, 100, FinishReason.STOP),  # one of several EOS ids
        ([2], {"max_tokens": 4}, 100, FinishReason.STOP),
        ([2], {"max_tokens": 4, "ignore_eos": True}, 100, None),
        ([9], {"max_tokens": 4, "stop_token_ids": (9,)}, 100, FinishReason.STOP),
        ([9], {"max_tokens": 4, "stop_token_ids": (9,), "ignore_eos": True}, 100,
         FinishReason.STOP),
        ([5, 6], {"max_tokens": 2}, 100, FinishReason.LENGTH),
        ([0, 6], {"max_tokens": 2}, 100, FinishReason.LENGTH),  # only the last token counts
        ([5, 0], {"max_tokens": 2}, 100, FinishReason.STOP),  # a stop token wins over length
        ([5], {"max_tokens": 9}, 4, FinishReason.LENGTH),  # 3 prompt + 1 = max_len
    ],
)  # fmt: skip
def test_check_stop(outputs, params, max_len, expected) -> None:
    req = _with_output(outputs, **params)
    before = (list(req.all_token_ids), req.status)
    assert check_stop(req, max_len) == expected
    assert (req.all_token_ids, req.status) == before  # pure


# ---- stream-interval output buffer -------------------------------------------------------


def test_output_buffer_merges_every_interval_and_flushes_first_and_last() -> None:
    buf = OutputBuffer(3, lambda outs: "".join(outs))
    assert buf.add("a", flush=True) == "a"  # the first token goes at once
    assert [buf.add(x) for x in "bcd"] == [None, None, "bcd"]
    assert buf.add("e") is None and len(buf) == 1
    assert buf.add("f!", flush=True) == "ef!"  # the final message carries what was held
    assert buf.take() is None
    buf.add("g")
    assert buf.take() == "g"  # e.g. before an error message
    with pytest.raises(ValueError, match="stream_interval=0 is invalid"):
        OutputBuffer(0, "".join)
