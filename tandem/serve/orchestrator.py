"""The serving loop: the token-budget Scheduler and an Engine, on one background thread.

Each iteration:
  1. takes the requests submitted since the last one into the scheduler;
  2. retires requests that were cancelled or ran past their deadline (queued, running or
     preempted): their pages are freed before the next step, so a client that hangs up
     costs at most the step in flight;
  3. `scheduler.schedule()` plans one step (decode rows + prompt chunks within
     `max_num_batched_tokens`, preempting the newest sequence when pages run out) and the
     engine runs it: one forward, one packed device->host transfer;
  4. `scheduler.update_from_output` appends the sampled tokens (stop tokens, max_tokens
     and max_len end requests there, `check_stop`); the loop then detokenizes each new
     token, matches stop strings (ending the request through `finish_requests`) and
     sends the caller its text, `stream_interval` tokens per message (`OutputBuffer`).
With `async_scheduling` (ServeConfig, on by default) the engine call returns once the
step is queued, and the loop commits the previous step (4) while this one runs: the
host's work overlaps the device's, each token reaches its caller one planning later
(tandem/serve/scheduler.py says what changes). Without it step 4 follows step 3 before
the next iteration plans anything (a decode row's input is the token the previous step
sampled), so the host work of steps 1-4 sits between two device steps
(docs/benchmarks.md measures both).

Callers talk to it from any thread: `submit` (bad input or a request that could never fit
-> ValueError naming the field, i.e. INVALID_ARGUMENT; a full queue -> RESOURCE_EXHAUSTED;
shutting down -> UNAVAILABLE) and `RequestHandle.cancel`. Results go to the caller's
`sink` callable, called on the loop thread; the last `Output` has `finish_reason` set,
or `error` for a request that ended abnormally. A preempted request is recomputed by the
scheduler and never seen as anything but slower by its caller.

`mode="static"` (ServeConfig) is the benchmark baseline only: the static admission policy
starts a batch once it is full (or its oldest request waited `static_batch_wait_s`) and
admits nothing until its last member ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tandem.model.tokenizer import IncrementalDetokenizer
from tandem.serve.config import ServeConfig
from tandem.serve.detok import TextStream
from tandem.serve.engine_api import Engine, RowToken, StepOutput
from tandem.serve.metrics import ServeMetrics
from tandem.serve.output_buffer import OutputBuffer
from tandem.serve.sampling import SamplingParams
from tandem.serve.scheduler import (
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    Scheduler,
    SchedulerOutput,
)
from tandem.serve.structured import GrammarCompiler, StructuredOutput

log = logging.getLogger(__name__)

# The sizes an engine compiles and allocates for: the loop takes them from the engine, the
# rest of its config (queue, stream interval, admission mode, prefix caching) from its own.
ENGINE_KEYS = (
    "max_seqs",
    "max_len",
    "max_prompt_len",
    "max_logprobs",
    "kv_cache_tokens",
    "page_size",
    "max_num_batched_tokens",
)


class RequestError(Exception):
    """A request ended abnormally; `code` is the gRPC status name the server returns."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class Output:
    """One message to the caller: new text and tokens; the last one has finish_reason."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[RowToken] = dataclasses.field(default_factory=list)
    # With SamplingParams.prompt_logprobs, on the first message: prompt tokens 1..n-1 (the
    # first has no logprob: nothing precedes it), each scored given the tokens before it.
    prompt_logprobs: list[RowToken] | None = None
    finish_reason: str = ""  # "", "length" or "stop"
    matched_stop: str = ""  # the stop string, or the stop token id as decimal text
    stop_token: int | None = None  # the stop token id, when one ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache
    error: RequestError | None = None

    @property
    def final(self) -> bool:
        return bool(self.finish_reason) or self.error is not None


def merge_outputs(outs: Sequence[Output]) -> Output:
    """Consecutive outputs of one request as one message (text and tokens concatenated, the
    last one's finish reason and usage)."""
    if len(outs) == 1:
        return outs[0]
    merged = Output(prompt_logprobs=outs[0].prompt_logprobs)
    for o in outs:
        merged.text += o.text
        merged.token_ids += o.token_ids
        merged.logprobs += o.logprobs
    last = outs[-1]
    merged.finish_reason, merged.matched_stop = last.finish_reason, last.matched_stop
    merged.stop_token = last.stop_token
    merged.prompt_tokens, merged.completion_tokens = last.prompt_tokens, last.completion_tokens
    merged.cached_prompt_tokens = last.cached_prompt_tokens
    return merged


Sink = Callable[[Output], None]


def loop_config(engine: Engine, cfg: ServeConfig | None) -> ServeConfig:
    """`cfg` with the engine's sizes (ENGINE_KEYS); the engine's own config if None."""
    if cfg is None:
        return engine.serve_cfg
    return dataclasses.replace(cfg, **{k: getattr(engine.serve_cfg, k) for k in ENGINE_KEYS})


class _Stream:
    """The loop's side of one request: where its output goes and how it is turned into
    text (the scheduler's `Request` holds its tokens and state)."""

    __slots__ = (
        "buffer",
        "cancelled",
        "created",
        "deadline",
        "first_token_time",
        "prompt_logprobs",
        "request",
        "sink",
        "text",
    )

    def __init__(self, request, sink, text, buffer, deadline, now) -> None:
        self.request: Request = request
        self.sink: Sink = sink
        self.text: TextStream = text
        self.buffer: OutputBuffer[Output] = buffer
        self.deadline: float | None = deadline
        self.created = now
        self.first_token_time: float | None = None
        self.cancelled: str | None = None  # the status a cancel ends it with
        # prompt logprobs by position until the first message sends them (None: not asked
        # or sent); by position, so a recompute after preemption adds nothing twice
        asked = request.sampling.prompt_logprobs is not None
        self.prompt_logprobs: dict[int, RowToken] | None = {} if asked else None


class RequestHandle:
    """What `submit` returns: lets the caller cancel (thread-safe, idempotent)."""

    def __init__(self, orchestrator: Orchestrator, stream: _Stream) -> None:
        self._orch = orchestrator
        self._stream = stream

    @property
    def id(self) -> str:
        return self._stream.request.request_id

    def cancel(self, code: str = "CANCELLED") -> None:
        """Ends the request with `code`: CANCELLED, or DEADLINE_EXCEEDED where the API
        layer's own deadline ended the call (grpc cancels a handler as its deadline
        passes)."""
        self._orch._cancel(self._stream, code)


class Orchestrator:
    def __init__(
        self,
        engine: Engine,
        cfg: ServeConfig | None = None,
        *,
        metrics: ServeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`cfg` (default: the engine's) passed whole; see `loop_config`."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.cfg = loop_config(engine, cfg)
        self.metrics = metrics
        self._clock = clock
        self._cv = threading.Condition()
        self._inbox: list[_Stream] = []  # submitted, not yet in the scheduler
        self._num_waiting = 0  # requests in the scheduler's queue not yet started
        self._streams: dict[str, _Stream] = {}  # every request in the scheduler, by id
        self._ids = itertools.count(1)
        self._rng = random.Random()
        self._accepting = True
        # Why the engine stopped for good (a failed step whose reset failed too); None
        # while it serves. `on_failure` (set by the API layer) is called once, then.
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_running = 0  # the most sequences one step ran (benchmarks report it)
        self._grammars: GrammarCompiler | None = None  # built at the first grammar request
        self._grammars_lock = threading.Lock()
        self._new_scheduler()

    def _new_scheduler(self) -> None:
        self.scheduler = Scheduler(self.cfg, cache_key=self.engine.cache_key, clock=self._clock)
        # async scheduling: the step the engine runs while the next one is planned
        self._in_flight: tuple[SchedulerOutput, StepOutput] | None = None
        self._counted = (0, 0, 0)  # prefix queries, hits, preemptions already in metrics

    # ---- caller side (any thread) -------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Checks a request against the served model and the cache (ValueError naming the
        field): a request that could never run is rejected here, never queued."""
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt_token_ids={bad[:4]!r} is invalid: ids must be in [0, {vocab})"
            )
        params.check_limits(vocab_size=vocab, max_logprobs=self.cfg.max_logprobs)
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)  # reads sizes only
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar engine over the served tokenizer (built once: about a second for a
        large vocabulary, paid by the first request that asks for structured output)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer)
            return self._grammars

    async def check_grammar(self, output: StructuredOutput) -> None:
        """Compiles `output` on the default executor (ValueError naming the field): the
        grammar engine's first build and each new grammar's compile take from ms to about
        a second, while the event loop serves every other stream. `validate` and `submit`
        then find it compiled."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.grammars.compile(output))  # both off-loop

    def room(self, prompt_len: int) -> int:
        """The most tokens a prompt of this length can be followed by: up to max_len, and
        within the whole KV-cache pool (< 1: the prompt alone does not fit)."""
        capacity = self.scheduler.kv.num_usable_pages * self.cfg.page_size + 1
        return min(self.cfg.max_len, capacity) - prompt_len

    @property
    def max_len(self) -> int:
        """The longest a sequence can run: `max_len`, or what the whole pool holds if that
        is less (what ModelInfo and /v1/models advertise)."""
        return self.room(0)

    @property
    def max_prompt_len(self) -> int:
        return min(self.cfg.max_prompt_len, self.max_len - 1)

    def default_params(self, prompt_len: int, **fields: Any) -> SamplingParams:
        """SamplingParams with max_tokens defaulted to `default_max_tokens`, or what fits
        if less (used when a request sends 0)."""
        if not fields.get("max_tokens"):
            fields["max_tokens"] = max(1, min(self.cfg.default_max_tokens, self.room(prompt_len)))
        return SamplingParams(**fields)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink,
        *,
        deadline: float | None = None,
    ) -> RequestHandle:
        """Queues a request. Raises ValueError (field named) or RequestError
        (RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when shutting down)."""
        self.validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        grammar = params.structured_output
        request = Request(
            str(next(self._ids)),
            prompt_ids,
            params,
            seed=seed,
            eos_token_ids=self.tokenizer.stop_ids,
            grammar=None
            if grammar is None
            else self.grammars.matcher(grammar, params.grammar_after_token),
        )
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        text = TextStream(detok, params.stop, params.min_tokens)
        buffer = OutputBuffer(self.cfg.stream_interval, merge_outputs)
        with self._cv:
            if not self._accepting:
                raise RequestError("UNAVAILABLE", self.failure or "server is shutting down")
            if self.queue_depth >= self.cfg.max_queue:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"queue is full ({self.cfg.max_queue} waiting requests); retry later",
                )
            stream = _Stream(request, sink, text, buffer, deadline, self._clock())
            self._inbox.append(stream)
            if self.metrics:
                self.metrics.queue_depth.set(self.queue_depth)
            self._cv.notify_all()
        return RequestHandle(self, stream)

    def _cancel(self, stream: _Stream, code: str) -> None:
        with self._cv:
            stream.cancelled = stream.cancelled or code
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet started (preempted ones are not counted)."""
        return len(self._inbox) + self._num_waiting

    @property
    def active_slots(self) -> int:
        """Running sequences (tandem_active_slots)."""
        return self.scheduler.num_running

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._inbox and not self._streams

    # ---- loop thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="tandem-orchestrator", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stops admitting; with drain, finishes queued and running requests first (until
        `timeout`), then cancels what is left and joins the loop thread."""
        with self._cv:
            self._accepting = False
            if not drain:
                self._stop = True
            self._cv.notify_all()
        if self._thread is None:
            return
        end = None if timeout is None else self._clock() + timeout
        while drain and not self.idle and (end is None or self._clock() < end):
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        self._thread = None
        self._abort_all("UNAVAILABLE", "server shut down")

    def _has_work(self, now: float) -> bool:
        return (
            bool(self._inbox)
            or self._in_flight is not None
            or self.scheduler.ready()
            or any(self._retire_reason(s, now) for s in self._streams.values())
        )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._has_work(self._clock()):
                    wait = self.cfg.static_batch_wait_s if self._streams else 0.5
                    self._cv.wait(timeout=wait)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing the running requests")
                try:
                    self._abort_running("INTERNAL", "engine step failed")
                except Exception:
                    log.exception("the engine did not recover; failing every request")
                    self._give_up()
                    return

    def step(self) -> bool:
        """One iteration (module docstring). Returns whether a step ran or was committed."""
        with self._cv:  # taken from the inbox and registered at once: `idle` sees it
            new, self._inbox = self._inbox, []
            for stream in new:
                self._streams[stream.request.request_id] = stream
            self.scheduler.draining = not self._accepting
        for stream in new:
            self.scheduler.add_request(stream.request)
        self._retire(self._clock())
        if self._in_flight is not None and self._grammar_waits_on_in_flight():
            self._commit(*self._in_flight)
            self._in_flight = None
        plan = self.scheduler.schedule()
        self.peak_running = max(self.peak_running, self.scheduler.num_running)
        done: tuple[SchedulerOutput, StepOutput] | None = None
        if plan.num_rows:
            out = self.engine.step(plan)  # returns once the step is queued on the device
            self.steps += 1
            if self.cfg.async_scheduling:  # commit the previous step while this one runs
                done, self._in_flight = self._in_flight, (plan, out)
            else:
                done = (plan, out)
        else:
            done, self._in_flight = self._in_flight, None
        if done is not None:
            self._commit(*done)
        self._num_waiting = sum(r.status == RequestStatus.WAITING for r in self.scheduler.waiting)
        self._set_gauges()
        return plan.num_rows > 0 or done is not None

    def _grammar_waits_on_in_flight(self) -> bool:
        """Whether a running request with a grammar has a token in flight: its next bitmask
        needs that token, so a step planned now would leave its row out (the scheduler's
        `may_continue`) and it would run every other step; committing first keeps it in
        every step, at the sync loop's pace while it runs."""
        return any(
            r.grammar is not None and r.num_output_placeholders for r in self.scheduler.running
        )

    def _commit(self, plan: SchedulerOutput, out: StepOutput) -> None:
        """Step 4 of the module docstring for one step that ran."""
        self._collect_prompt_logprobs(plan, out)
        for output in self.scheduler.update_from_output(plan, out.tokens(plan.num_rows)):
            self._on_token(output, out)

    @staticmethod
    def _retire_reason(stream: _Stream, now: float) -> tuple[str, str] | None:
        deadline = stream.deadline is not None and now >= stream.deadline
        if deadline or stream.cancelled == "DEADLINE_EXCEEDED":
            return "DEADLINE_EXCEEDED", "deadline exceeded before generation finished"
        if stream.cancelled:
            return "CANCELLED", "request cancelled"
        return None

    def _retire(self, now: float) -> None:
        for stream in list(self._streams.values()):
            reason = self._retire_reason(stream, now)
            if reason is not None:
                self._fail(stream, *reason)

    def _collect_prompt_logprobs(self, plan: SchedulerOutput, out: StepOutput) -> None:
        """Keeps the prompt logprobs a step computed for the requests that asked."""
        for row, request in enumerate(plan.requests):
            top_n = request.sampling.prompt_logprobs
            stream = self._streams.get(request.request_id)
            if top_n is None or stream is None or stream.prompt_logprobs is None:
                continue
            collected = stream.prompt_logprobs
            for t in range(plan.cu_q_lens[row], plan.cu_q_lens[row + 1]):
                after = int(plan.positions[t]) + 1  # the prompt token scored there
                if after < request.num_prompt_tokens and after not in collected:
                    collected[after] = out.prompt_token(t, after, top_n)

    def _on_token(self, output: RequestOutput, out: StepOutput) -> None:
        """Turns one sampled token into text and a message (or holds it back)."""
        request = output.request
        stream = self._streams[request.request_id]
        now = self._clock()
        first = stream.first_token_time is None
        if first:
            stream.first_token_time = now
            if self.metrics:
                self.metrics.ttft.observe(now - stream.created)
        if self.metrics:
            self.metrics.generated_tokens.inc()
        token = output.token
        logprobs = (
            [out.row(output.row, request.sampling.logprobs)] if request.sampling.logprobs else []
        )
        emit = Output(token_ids=[token], logprobs=logprobs)
        if stream.prompt_logprobs is not None:
            collected = stream.prompt_logprobs
            emit.prompt_logprobs = [collected[p] for p in range(1, request.num_prompt_tokens)]
            stream.prompt_logprobs = None
        if output.finish_reason == FinishReason.STOP:  # a stop token id
            emit.text = stream.text.finish()
            emit.finish_reason, emit.matched_stop = "stop", str(token)
            emit.stop_token = token
        else:
            emit.text, matched = stream.text.push(token)
            if matched is not None:
                emit.finish_reason, emit.matched_stop = "stop", matched
                self.scheduler.finish_requests([request.request_id], FinishReason.STOP)
            elif output.finish_reason == FinishReason.LENGTH:
                emit.text += stream.text.finish()
                emit.finish_reason = "length"
        if emit.finish_reason:
            self._usage(emit, request)
            del self._streams[request.request_id]
            if self.metrics:
                self.metrics.observe_finished(
                    ttft=stream.first_token_time - stream.created,
                    e2e=now - stream.created,
                    tokens=request.num_output_tokens,
                )
                self.metrics.count_request("OK")
        message = stream.buffer.add(emit, flush=first or bool(emit.finish_reason))
        if message is not None:
            self._send(stream, message)

    @staticmethod
    def _usage(out: Output, request: Request) -> None:
        out.prompt_tokens = request.num_prompt_tokens
        out.completion_tokens = request.num_output_tokens
        out.cached_prompt_tokens = request.num_cached_tokens

    def _fail(self, stream: _Stream, code: str, message: str) -> None:
        """Ends a request with an error, after sending what stream_interval held back."""
        request = stream.request
        self.scheduler.finish_requests([request.request_id])
        self._streams.pop(request.request_id, None)
        if self.metrics:
            self.metrics.count_request(code)
        held = stream.buffer.take()
        if held is not None:
            self._send(stream, held)
        error = Output(error=RequestError(code, message))
        self._usage(error, request)
        self._send(stream, error)

    def _send(self, stream: _Stream, out: Output) -> None:
        try:
            stream.sink(out)
        except Exception:
            log.exception("sink of request %s failed; cancelling it", stream.request.request_id)
            stream.cancelled = "CANCELLED"

    def _abort_running(self, code: str, message: str) -> None:
        """After a failed step: fails every started request (running or preempted), then
        starts over with a fresh cache and scheduler; queued requests keep their place."""
        queued = [r for r in self.scheduler.waiting if r.status == RequestStatus.WAITING]
        for stream in list(self._streams.values()):
            if stream.request not in queued:
                self._fail(stream, code, message)
        self.engine.reset()
        self._new_scheduler()
        for request in queued:
            self.scheduler.add_request(request)

    def _give_up(self) -> None:
        """The engine failed and so did its reset: nothing can run any more. Stops
        admitting (new requests: UNAVAILABLE, naming why), fails every request with
        INTERNAL, queued ones included, and tells the API layer (health: NOT_SERVING)."""
        with self._cv:
            self._accepting = False
            self.failure = "the engine failed and could not recover; restart the replica"
        self._abort_all("INTERNAL", self.failure)
        if self.on_failure is not None:
            self.on_failure()

    def _abort_all(self, code: str, message: str) -> None:
        with self._cv:
            new, self._inbox = self._inbox, []
        for stream in [*new, *self._streams.values()]:
            self._fail(stream, code, message)
        self._num_waiting = 0
        self._set_gauges()

    def _set_gauges(self) -> None:
        if not self.metrics:
            return
        m, sched = self.metrics, self.scheduler
        m.queue_depth.set(self.queue_depth)
        m.active_slots.set(sched.num_running)
        m.kv_cache_usage.set(sched.kv.usage)
        now = (sched.kv.prefix_queries, sched.kv.prefix_hits, sched.num_preemptions)
        queries, hits, preemptions = (a - b for a, b in zip(now, self._counted, strict=True))
        m.prefix_cache_queries.inc(queries)
        m.prefix_cache_hits.inc(hits)
        m.preemptions.inc(preemptions)
        self._counted = now
