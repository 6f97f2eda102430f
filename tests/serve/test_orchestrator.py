"""Orchestrator behaviour on the fake engine, stepped by hand so every claim is exact."""

from __future__ import annotations

import threading
import time

import pytest

from tandem.model.tokenizer import BOS, EOS, Tokenizer
from tandem.serve.config import ServeConfig
from tandem.serve.fake_engine import FakeEngine
from tandem.serve.orchestrator import Orchestrator, Output, RequestError
from tandem.serve.sampling import SamplingParams
from tandem.serve.structured import StructuredOutput


class Collector:
    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, out: Output) -> None:
        self.outputs.append(out)
        if out.final:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def last(self) -> Output:
        return self.outputs[-1]


# the loop's two orders: each step committed before the next is planned, or after (async)
ASYNC = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


def _orch(tokenizer, *, clock=None, **cfg) -> tuple[Orchestrator, FakeEngine]:
    """A fake engine and its loop, both with ServeConfig(**cfg) (4 sequences, prompts of
    up to 64 tokens and max_len 128 unless cfg says otherwise)."""
    cfg = {"max_seqs": 4, "max_prompt_len": 64, **cfg}
    engine = FakeEngine(tokenizer, ServeConfig(**cfg))
    return Orchestrator(engine, clock=clock or time.monotonic), engine


def _submit(orch, tokenizer, text: str, **params) -> tuple[Collector, object]:
    sink = Collector()
    params.setdefault("max_tokens", 64)
    handle = orch.submit(tokenizer.encode(text), SamplingParams(**params), sink)
    return sink, handle


def _drain(orch, limit: int = 1000) -> None:
    for _ in range(limit):
        if not orch.step():
            return
    raise AssertionError("orchestrator did not go idle")


@ASYNC
def test_echo_generation_and_usage(tokenizer, async_scheduling) -> None:
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling)
    sink, _ = _submit(orch, tokenizer, "héllo")
    _drain(orch)
    assert sink.text == "héllo"
    assert sink.last.finish_reason == "stop" and sink.last.matched_stop == str(tokenizer.eos_id)
    assert sink.tokens[-1] == tokenizer.eos_id
    assert sink.last.prompt_tokens == len(tokenizer.encode("héllo"))
    assert sink.last.completion_tokens == len(sink.tokens)
    assert orch.active_slots == 0


@ASYNC
def test_max_tokens_finishes_with_length(tokenizer, async_scheduling) -> None:
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling)
    sink, _ = _submit(orch, tokenizer, "abcdef", max_tokens=3)
    _drain(orch)
    assert (sink.text, sink.last.finish_reason, sink.last.completion_tokens) == ("abc", "length", 3)


@ASYNC
def test_max_tokens_one_finishes_with_its_prompt_step(tokenizer, async_scheduling) -> None:
    orch, engine = _orch(tokenizer, async_scheduling=async_scheduling)
    sink, _ = _submit(orch, tokenizer, "abc", max_tokens=1)
    _drain(orch)
    assert sink.tokens == [ord("a")] and engine.step_calls == 1 and orch.active_slots == 0
    assert orch.scheduler.kv.usage == 0.0


@ASYNC
def test_stop_string_across_tokens_not_emitted(tokenizer, async_scheduling) -> None:
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling)
    sink, _ = _submit(orch, tokenizer, "one two STOP three", stop=("STOP",))
    _drain(orch)
    assert sink.text == "one two "
    assert all("S" not in o.text for o in sink.outputs)
    assert sink.last.matched_stop == "STOP"


def test_min_tokens_holds_back_stop_strings_too(tokenizer) -> None:
    orch, _ = _orch(tokenizer)
    sink, _ = _submit(orch, tokenizer, "a. b. c", stop=(".",), min_tokens=3, max_tokens=7)
    _drain(orch)
    assert (sink.text, sink.last.matched_stop) == ("a. b", ".")


@ASYNC
def test_stop_token_ids_and_ignore_eos(tokenizer, async_scheduling) -> None:
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling)
    a, _ = _submit(orch, tokenizer, "abcd", stop_token_ids=(ord("c"),))
    b, _ = _submit(orch, tokenizer, "ab", ignore_eos=True, max_tokens=5)
    _drain(orch)
    assert a.text == "ab" and a.tokens[-1] == ord("c") and a.last.matched_stop == str(ord("c"))
    assert b.last.finish_reason == "length" and tokenizer.eos_id in b.tokens


def test_every_model_stop_id_ends_generation(tokenizer) -> None:
    """The model's stop ids (EOS + generation_config's) all stop; ignore_eos ignores them all."""
    model_tok = Tokenizer(tokenizer.hf, bos_token=BOS, eos_token=EOS, stop_token_ids=[ord("c")])
    orch, _ = _orch(model_tok)
    a, _ = _submit(orch, model_tok, "abcd")
    b, _ = _submit(orch, model_tok, "abcd", ignore_eos=True, max_tokens=5)
    _drain(orch)
    assert a.text == "ab" and a.last.finish_reason == "stop" and a.tokens[-1] == ord("c")
    assert a.last.matched_stop == str(ord("c"))
    assert b.tokens == [*b"abcd", model_tok.eos_id] and b.last.finish_reason == "length"


def test_utf8_split_characters_stream_whole(tokenizer) -> None:
    orch, _ = _orch(tokenizer)
    sink, _ = _submit(orch, tokenizer, "日本語 🎉 ok")
    _drain(orch)
    assert sink.text == "日本語 🎉 ok"
    assert all("\ufffd" not in o.text for o in sink.outputs)
    assert sum(1 for o in sink.outputs if o.text == "") >= 6  # bytes held until complete


def test_continuous_batching_admits_between_steps(tokenizer) -> None:
    # step by step as the sync loop runs them (async commits each step one iteration later)
    orch, engine = _orch(tokenizer, max_seqs=2, async_scheduling=False)
    long, _ = _submit(orch, tokenizer, "a" * 40)
    short, _ = _submit(orch, tokenizer, "b" * 3)
    queued, _ = _submit(orch, tokenizer, "c" * 4)
    orch.step()
    assert orch.active_slots == 2 and orch.queue_depth == 1  # both sequences run, one waits
    for _ in range(3):
        orch.step()
    assert short.last.finish_reason == "stop" and not queued.outputs
    orch.step()  # the sequence that ended in the last step is replaced in the next one
    assert queued.outputs and not long.last.final  # admitted while `long` runs
    late, _ = _submit(orch, tokenizer, "d")  # arrives while `long` still decodes
    for _ in range(5):
        orch.step()
    assert queued.text == "cccc"
    assert late.text == "d" and not long.last.final
    _drain(orch)
    assert long.text == "a" * 40
    assert engine.max_active == 2


def test_finished_slot_refilled_while_others_run(tokenizer) -> None:
    # the sync loop's step count (async spends a wasted row on each request that ends)
    orch, engine = _orch(tokenizer, max_seqs=2, async_scheduling=False)
    long, _ = _submit(orch, tokenizer, "L" * 30)
    shorts = [_submit(orch, tokenizer, "s" * 3)[0] for _ in range(5)]
    _drain(orch)
    assert long.text == "L" * 30 and all(s.text == "sss" for s in shorts)
    # all five short requests ran while the long one held the other sequence
    assert engine.step_calls == 31  # the long one's 30 tokens and EOS
    assert engine.rows_history[:20] == [2] * 20  # 5 x 4 tokens, never a step with one row


def test_async_scheduling_commits_first_while_a_grammar_request_runs(tokenizer) -> None:
    """A grammar's next bitmask needs its last token, so a step planned ahead of that
    token's commit would leave its row out: while a request with a grammar runs, the async
    loop commits before it plans, and that request gets a row in every step, as in sync."""
    orch, engine = _orch(tokenizer, max_seqs=2, async_scheduling=True)
    free, _ = _submit(orch, tokenizer, "a" * 12, ignore_eos=True, max_tokens=40)
    fenced, _ = _submit(
        orch, tokenizer, "b" * 12, structured_output=StructuredOutput("regex", "b+")
    )
    _drain(orch)
    assert fenced.text == "b" * 12 and fenced.last.finish_reason == "stop"
    assert free.last.finish_reason == "length"
    assert engine.rows_history[:13] == [2] * 13  # both prompts, then both decode each step


@ASYNC
def test_a_grammar_after_a_token_leaves_what_precedes_it_free(tokenizer, async_scheduling) -> None:
    """A reasoning model's thinking is free text and its answer matches the grammar: with
    grammar_after_token the grammar holds from the token after that one (here "!")."""
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling)
    (bang,) = tokenizer.encode("!", add_special_tokens=False)
    fenced = StructuredOutput("regex", "b+")
    gated, _ = _submit(
        orch, tokenizer, "a a!bb", structured_output=fenced, grammar_after_token=bang
    )
    held, _ = _submit(orch, tokenizer, "a a!bb", structured_output=fenced)
    _drain(orch)
    assert gated.text == "a a!bb" and gated.last.finish_reason == "stop"
    assert held.text != "a a!bb" and held.text.startswith("b")  # held from the first token
    with pytest.raises(ValueError, match="grammar_after_token"):
        SamplingParams(grammar_after_token=bang)  # only with a structured output
    with pytest.raises(ValueError, match="grammar_after_token"):
        _submit(orch, tokenizer, "x", structured_output=fenced, grammar_after_token=10**6)


@ASYNC
def test_cancel_running_frees_its_pages_within_one_step(tokenizer, async_scheduling) -> None:
    orch, _ = _orch(tokenizer, async_scheduling=async_scheduling, max_seqs=1)
    sink, handle = _submit(orch, tokenizer, "x" * 50)
    waiting, _ = _submit(orch, tokenizer, "ok")
    for _ in range(3):
        orch.step()
    assert orch.active_slots == 1 and orch.queue_depth == 1
    handle.cancel()
    orch.step()  # the very next step retires it and admits the waiting request
    assert sink.last.error is not None and sink.last.error.code == "CANCELLED"
    assert orch.queue_depth == 0 and orch.active_slots == 1
    _drain(orch)
    assert waiting.text == "ok" and orch.active_slots == 0
    assert orch.scheduler.kv.usage == 0.0


def test_stream_interval_groups_tokens_first_and_last_at_once(tokenizer) -> None:
    text = "stream me in chunks, please"
    plain, _ = _orch(tokenizer)
    want, _ = _submit(plain, tokenizer, text)
    _drain(plain)
    orch, _ = _orch(tokenizer, stream_interval=4)
    sink, _ = _submit(orch, tokenizer, text)
    _drain(orch)
    assert sink.tokens == want.tokens and sink.text == want.text
    sizes = [len(o.token_ids) for o in sink.outputs]
    assert sizes[0] == 1  # the first token is never held back (TTFT)
    assert all(n == 4 for n in sizes[1:-1]) and 1 <= sizes[-1] <= 4
    assert sink.last.finish_reason == "stop" and sink.last.completion_tokens == len(want.tokens)


def test_stream_interval_delivers_held_tokens_before_an_error(tokenizer) -> None:
    orch, _ = _orch(tokenizer, max_seqs=1, stream_interval=8)
    sink, handle = _submit(orch, tokenizer, "x" * 50)
    for _ in range(5):  # first token sent, four more held back
        orch.step()
    assert sum(len(o.token_ids) for o in sink.outputs) == 1
    handle.cancel()
    orch.step()
    assert sink.last.error is not None and sink.last.error.code == "CANCELLED"
    assert not sink.last.token_ids  # the error is a message of its own ...
    assert len(sink.tokens) == sink.last.completion_tokens >= 4  # ... after every token made


def test_stream_interval_must_be_positive(tokenizer) -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        _orch(tokenizer, stream_interval=0)


def test_cancel_queued_request(tokenizer) -> None:
    orch, engine = _orch(tokenizer, max_seqs=1)
    _submit(orch, tokenizer, "x" * 10)
    sink, handle = _submit(orch, tokenizer, "never")
    handle.cancel()
    orch.step()
    assert sink.last.error.code == "CANCELLED" and orch.queue_depth == 0
    assert engine.prompt_starts == 1


def test_deadline_running_and_queued(tokenizer) -> None:
    now = [100.0]
    orch, _ = _orch(tokenizer, max_seqs=1, clock=lambda: now[0])
    run = Collector()
    orch.submit(tokenizer.encode("y" * 30), SamplingParams(max_tokens=40), run, deadline=101.0)
    queued = Collector()
    orch.submit(tokenizer.encode("q"), SamplingParams(max_tokens=4), queued, deadline=100.5)
    orch.step()
    now[0] = 100.6
    orch.step()
    assert queued.last.error.code == "DEADLINE_EXCEEDED"
    assert run.last.error is None
    now[0] = 101.0
    orch.step()
    assert run.last.error.code == "DEADLINE_EXCEEDED" and orch.active_slots == 0


def test_queue_overflow_is_resource_exhausted(tokenizer) -> None:
    orch, _ = _orch(tokenizer, max_seqs=1, max_queue=2)
    for _ in range(2):
        _submit(orch, tokenizer, "a")
    with pytest.raises(RequestError) as err:
        _submit(orch, tokenizer, "a")
    assert err.value.code == "RESOURCE_EXHAUSTED"


def test_prompt_limits_rejected_not_truncated(tokenizer) -> None:
    orch, _ = _orch(tokenizer, max_prompt_len=8, max_len=16)
    with pytest.raises(ValueError, match="prompt"):
        _submit(orch, tokenizer, "x" * 8)  # 9 tokens with BOS
    with pytest.raises(ValueError, match="max_tokens"):
        _submit(orch, tokenizer, "x", max_tokens=15)  # 2 + 15 > 16
    with pytest.raises(ValueError, match="prompt"):
        orch.submit([], SamplingParams(), Collector())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        orch.submit([tokenizer.vocab_size], SamplingParams(), Collector())


def test_static_mode_waits_for_full_batch(tokenizer) -> None:
    now = [0.0]
    orch, engine = _orch(
        tokenizer, max_seqs=2, mode="static", static_batch_wait_s=1.0, clock=lambda: now[0]
    )
    _submit(orch, tokenizer, "a" * 10)
    assert not orch.step() and engine.step_calls == 0  # batch not full, not timed out
    b, _ = _submit(orch, tokenizer, "b")
    c, _ = _submit(orch, tokenizer, "c")
    orch.step()
    assert engine.prompt_starts == 2
    for _ in range(5):
        orch.step()
    assert b.last.final and not c.outputs  # c waits although a sequence could start
    assert engine.rows_history[-1] == 1  # (b's finished row costs the batch nothing)
    _drain(orch)
    assert not c.outputs  # a lone request waits for the batch timeout
    now[0] = 5.0
    _drain(orch)
    assert c.text == "c"


def test_threaded_loop_and_drain(tokenizer) -> None:
    engine = FakeEngine(tokenizer, ServeConfig(max_seqs=2), step_delay=0.001)
    orch = Orchestrator(engine)
    orch.start()
    sinks = [Collector() for _ in range(6)]
    for i, s in enumerate(sinks):
        orch.submit(tokenizer.encode(f"req{i}"), SamplingParams(max_tokens=32), s)
    orch.stop(drain=True, timeout=10)
    assert [s.text for s in sinks] == [f"req{i}" for i in range(6)]
    with pytest.raises(RequestError) as err:
        orch.submit(tokenizer.encode("late"), SamplingParams(), Collector())
    assert err.value.code == "UNAVAILABLE"


def test_drain_keeps_a_request_the_loop_is_taking_from_the_inbox(tokenizer) -> None:
    """stop(drain=True) between the loop taking the inbox and registering the request must
    not see the loop idle and abort it; a slow registration widens that window."""

    class SlowRegistry(dict):
        def __setitem__(self, key, value) -> None:
            time.sleep(0.3)  # the loop thread descheduled mid-registration
            super().__setitem__(key, value)

    orch, _ = _orch(tokenizer, max_seqs=2)
    orch._streams = SlowRegistry()
    orch.start()
    sink, _ = _submit(orch, tokenizer, "hello", max_tokens=16)
    orch.stop(drain=True, timeout=10)
    assert sink.last.error is None, sink.last.error
    assert sink.text == "hello"


def test_engine_failure_fails_running_requests(tokenizer) -> None:
    engine = FakeEngine(tokenizer, ServeConfig(max_seqs=2))
    orch = Orchestrator(engine)
    sink, _ = _submit(orch, tokenizer, "abc")
    orch.step()
    step = engine.step

    def boom(plan):
        raise RuntimeError("device lost")

    engine.step = boom
    orch.start()
    assert sink.done.wait(5)
    assert sink.last.error.code == "INTERNAL" and orch.active_slots == 0
    assert orch.scheduler.kv.usage == 0.0  # a fresh scheduler (and cache) ...
    engine.step = step
    after = Collector()
    orch.submit(tokenizer.encode("ok"), SamplingParams(max_tokens=8), after)
    assert after.done.wait(5) and after.text == "ok"  # ... that serves the next requests
    orch.stop(drain=False)


def test_an_engine_that_cannot_recover_fails_every_request_and_refuses_new_ones(
    tokenizer,
) -> None:
    """A failed step whose reset fails too: the running and the queued requests get
    INTERNAL (none hangs), new ones UNAVAILABLE naming why, and the API layer is told."""
    engine = FakeEngine(tokenizer, ServeConfig(max_seqs=1))
    orch = Orchestrator(engine)
    told = threading.Event()
    orch.on_failure = told.set

    def boom(*_):
        raise RuntimeError("device lost")

    running, _ = _submit(orch, tokenizer, "abc")
    queued, _ = _submit(orch, tokenizer, "def")  # max_seqs 1: waits
    engine.step, engine.reset = boom, boom
    orch.start()
    assert running.done.wait(5) and queued.done.wait(5)
    assert running.last.error.code == queued.last.error.code == "INTERNAL"
    assert told.wait(5) and "could not recover" in orch.failure
    with pytest.raises(RequestError) as err:
        _submit(orch, tokenizer, "later")
    assert err.value.code == "UNAVAILABLE" and err.value.message == orch.failure
    orch.stop(drain=True, timeout=5)


# ---- the paged cache through the loop -----------------------------------------------------


@ASYNC
def test_preempted_requests_are_recomputed_not_dropped(tokenizer, async_scheduling) -> None:
    # 15 usable pages of 4 for 4 sequences of up to 49 tokens: the pool runs out mid-run
    orch, engine = _orch(
        tokenizer, page_size=4, kv_cache_tokens=16 * 4, enable_prefix_caching=False,
        async_scheduling=async_scheduling,
    )  # fmt: skip
    texts = [f"request {i}: " + "xyz"[i % 3] * (3 + 2 * i) for i in range(6)]
    sinks = [_submit(orch, tokenizer, t, max_tokens=25)[0] for t in texts]
    _drain(orch)
    assert orch.scheduler.num_preemptions > 0
    assert [s.text for s in sinks] == texts  # everything generated, nothing twice
    assert all(s.last.finish_reason == "stop" for s in sinks)
    assert engine.prompt_starts > len(texts)  # the preempted ones started over
    assert orch.scheduler.kv.usage == 0.0


@ASYNC
def test_a_long_prompt_is_chunked_while_others_stream(tokenizer, async_scheduling) -> None:
    orch, engine = _orch(
        tokenizer, async_scheduling=async_scheduling, max_num_batched_tokens=16, max_prompt_len=100
    )
    streams = [_submit(orch, tokenizer, "s" * 20)[0] for _ in range(2)]
    for _ in range(4):
        orch.step()
    long, _ = _submit(orch, tokenizer, "L" * 60)
    before = [len(s.tokens) for s in streams]
    for _ in range(4):  # 61 prompt tokens in chunks of 16 - 2 while both keep decoding
        orch.step()
    assert [len(s.tokens) - b for s, b in zip(streams, before, strict=True)] == [4, 4]
    assert not long.outputs and max(engine.tokens_history) == 16
    _drain(orch)
    assert long.text == "L" * 60 and all(s.text == "s" * 20 for s in streams)


def test_usage_reports_cached_prompt_tokens(tokenizer) -> None:
    orch, _ = _orch(tokenizer, page_size=4)
    first, _ = _submit(orch, tokenizer, "shared prefix, then a")
    _drain(orch)
    second, _ = _submit(orch, tokenizer, "shared prefix, then b")
    _drain(orch)
    assert first.last.cached_prompt_tokens == 0
    assert second.last.cached_prompt_tokens == 20  # BOS + 19 equal characters: 5 pages
    assert second.text == "shared prefix, then b"


def test_a_request_larger_than_the_cache_is_rejected_up_front(tokenizer) -> None:
    orch, _ = _orch(tokenizer, page_size=4, kv_cache_tokens=9 * 4)  # 32 usable positions
    with pytest.raises(ValueError, match="must fit the whole KV cache"):
        _submit(orch, tokenizer, "x" * 20, max_tokens=20)
    _submit(orch, tokenizer, "x" * 20, max_tokens=12)  # 21 + 12 - 1 = 32 fits


def test_short_requests_run_8x_the_slots_in_the_same_cache_memory(tokenizer) -> None:
    # The slot engine reserved max_len per sequence: 4 slots of 1024 positions. The same
    # 4096 positions in pages of 16 hold 64 requests of 64 tokens at once.
    orch, engine = _orch(
        tokenizer, max_seqs=64, max_len=1024, kv_cache_tokens=4 * 1024 + 16, max_queue=64
    )
    texts = [f"{i:02d}" + "." * 40 for i in range(64)]  # 43 prompt + 21 output tokens
    sinks = [_submit(orch, tokenizer, t, max_tokens=21)[0] for t in texts]
    _drain(orch)
    assert engine.max_active == 64 >= 8 * 4 and orch.scheduler.num_preemptions == 0
    assert [s.text for s in sinks] == [t[:21] for t in texts]
