"""Continuous (iteration-level) batching over an Engine, on one background thread.

The loop, once per decode step:
  1. retire requests that were cancelled or ran past their deadline (queued or running):
     a running one's slot is freed before the next decode step, so a client that hangs up
     costs at most one more step (JetStream only frees at EOS/max length);
  2. admit: pop waiting requests into free slots (prefill, emit token 1, insert);
  3. dispatch one `engine.generate` for all slots and, while the device runs it, handle
     the PREVIOUS step's tokens (one host transfer): per slot detokenize, check stop
     tokens / stop strings / max_tokens / full cache, emit, free finished slots.
Handling step N-1 while step N runs hides the host work behind the device (JetStream's
detokenize thread and vLLM's async scheduling do the same). The price: a request that
finishes at step N-1 also occupies its slot in step N, whose token for it is discarded.

Callers talk to it from any thread: `submit` (bounded queue -> RESOURCE_EXHAUSTED, bad input
-> INVALID_ARGUMENT with the field named) and `RequestHandle.cancel`. Results go to the
caller's `sink` callable, called on the loop thread, one `Output` per generated token; the
last has `finish_reason` set, or `error` for a request that ended abnormally.

`mode="static"` is the benchmark baseline only: it waits for a full batch (or a timeout),
runs it until every member finishes, and admits nothing meanwhile. Like any static
batcher (`transformers` `generate`, FasterTransformer in the Orca paper) the batch keeps
its finished members' rows until the end: their slots are freed with the last one, so
the engine keeps stepping the whole batch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tandem.serve.detok import TextStream
from tandem.serve.engine_api import Engine, SlotToken, StepOutput
from tandem.serve.metrics import ServeMetrics
from tandem.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


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
    logprobs: list[SlotToken] = dataclasses.field(default_factory=list)
    finish_reason: str = ""  # "", "length" or "stop"
    matched_stop: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: RequestError | None = None

    @property
    def final(self) -> bool:
        return bool(self.finish_reason) or self.error is not None


def merge_outputs(outs: Sequence[Output]) -> Output:
    """Consecutive outputs of one request as one message (text and tokens concatenated, the
    last one's finish reason and usage)."""
    if len(outs) == 1:
        return outs[0]
    merged = Output()
    for o in outs:
        merged.text += o.text
        merged.token_ids += o.token_ids
        merged.logprobs += o.logprobs
    last = outs[-1]
    merged.finish_reason, merged.matched_stop = last.finish_reason, last.matched_stop
    merged.prompt_tokens, merged.completion_tokens = last.prompt_tokens, last.completion_tokens
    return merged


Sink = Callable[[Output], None]
DetokFactory = Callable[[Any], Any]


def _default_detokenizer(tokenizer: Any) -> Any:
    from tandem.model.tokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer)


class _Request:
    __slots__ = (
        "cancelled",
        "created",
        "deadline",
        "first_token_time",
        "generated",
        "id",
        "params",
        "prompt_ids",
        "seed",
        "sink",
        "slot",
        "stop_ids",
        "stream",
        "unsent",
    )

    def __init__(self, rid, prompt_ids, params, seed, sink, deadline, stream, stop_ids, now):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.sink = sink
        self.deadline = deadline
        self.stream = stream
        self.stop_ids = stop_ids
        self.created = now
        self.first_token_time: float | None = None
        self.generated = 0
        self.slot: int | None = None
        self.cancelled = False
        self.unsent: list[Output] = []  # tokens held back by stream_interval


class RequestHandle:
    """What `submit` returns: lets the caller cancel (thread-safe, idempotent)."""

    def __init__(self, orchestrator: Orchestrator, request: _Request) -> None:
        self._orch = orchestrator
        self._req = request

    @property
    def id(self) -> int:
        return self._req.id

    def cancel(self) -> None:
        self._orch._cancel(self._req)


class Orchestrator:
    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = 64,
        default_max_tokens: int = 256,
        mode: str = "continuous",
        static_batch_wait_s: float = 0.05,
        max_prefills_per_step: int = 0,
        stream_interval: int = 1,
        metrics: ServeMetrics | None = None,
        detokenizer_factory: DetokFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("continuous", "static"):
            raise ValueError(f"mode={mode!r} is invalid: allowed 'continuous', 'static'")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.mode = mode
        self.static_batch_wait_s = static_batch_wait_s
        self.max_prefills_per_step = max_prefills_per_step
        if stream_interval < 1:
            raise ValueError(f"stream_interval={stream_interval!r} is invalid: must be >= 1")
        self.stream_interval = stream_interval
        self.metrics = metrics
        self._detok = detokenizer_factory or _default_detokenizer
        self._clock = clock
        self._cv = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # slot -> request
        self._free_slots = list(range(engine.max_slots - 1, -1, -1))
        self._finished_slots: list[int] = []  # still held by a static batch
        self._ids = itertools.count(1)
        self._rng = random.Random()
        self._state: Any = None  # engine state, made on the loop's first step (after warm-up)
        # The dispatched step not yet handled: its output and who held each slot then.
        self._in_flight: tuple[StepOutput, dict[int, _Request]] | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---- caller side (any thread) -------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Checks a request against the served model; returns its effective max_tokens."""
        eng = self.engine
        if len(prompt_ids) == 0:
            raise ValueError("prompt is invalid: it is empty (send at least one token)")
        if len(prompt_ids) > eng.max_prompt_len:
            raise ValueError(
                f"prompt is invalid: {len(prompt_ids)} tokens exceed max_prompt_len "
                f"{eng.max_prompt_len} (prompts are never truncated)"
            )
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt_token_ids={bad[:4]!r} is invalid: ids must be in [0, {vocab})"
            )
        params.check_limits(vocab_size=vocab, max_logprobs=eng.max_logprobs)
        room = eng.max_len - len(prompt_ids)
        if params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} is invalid: prompt ({len(prompt_ids)} tokens) "
                f"+ max_tokens must be <= max_len {eng.max_len}"
            )
        return params.max_tokens

    def default_params(self, prompt_len: int, **fields: Any) -> SamplingParams:
        """SamplingParams with max_tokens defaulted to what fits (used when a request sends 0)."""
        if not fields.get("max_tokens"):
            fields["max_tokens"] = max(
                1, min(self.default_max_tokens, self.engine.max_len - prompt_len)
            )
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
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.stop_ids
        stream = TextStream(self._detok(self.tokenizer), params.stop)
        with self._cv:
            if not self._accepting:
                raise RequestError("UNAVAILABLE", "server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"queue is full ({self.max_queue} waiting requests); retry later",
                )
            req = _Request(
                next(self._ids), list(prompt_ids), params, seed, sink, deadline, stream,
                frozenset(stop_ids), self._clock(),
            )  # fmt: skip
            self._queue.append(req)
            self._set_gauges()
            self._cv.notify_all()
        return RequestHandle(self, req)

    def _cancel(self, req: _Request) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._queue and not self._running

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

    def _has_work(self) -> bool:
        if self._running or self._in_flight is not None:
            return True
        if not self._queue:
            return False
        return (
            self.mode == "continuous"
            or self._static_batch_ready()
            or any(r.cancelled for r in self._queue)
        )

    def _static_batch_ready(self) -> bool:
        if self._running or not self._queue:
            return False
        waited = self._clock() - self._queue[0].created
        return (
            len(self._queue) >= self.engine.max_slots
            or waited >= self.static_batch_wait_s
            or not self._accepting
        )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait(timeout=self.static_batch_wait_s if self._queue else 0.5)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing the running requests")
                self._abort_running("INTERNAL", "engine step failed")

    def step(self) -> bool:
        """One iteration: retire, admit, dispatch a decode step, handle the previous one.
        Returns whether anything ran."""
        if self._state is None:
            self._state = self.engine.init_state()
        now = self._clock()
        self._retire(now)
        admitted = self._admit()
        previous, self._in_flight = self._in_flight, None
        if self._running:
            holders = dict(self._running)
            self._state, out = self.engine.generate(self._state)
            self._in_flight = (out, holders)
            self.steps += 1
        if previous is not None:
            self._handle_step(*previous)
        self._set_gauges()
        return admitted or previous is not None or self._in_flight is not None

    def _handle_step(self, out: StepOutput, holders: dict[int, _Request]) -> None:
        for slot, req in holders.items():
            if req.slot == slot:  # else it finished or was retired since the dispatch
                self._on_token(req, out, slot)

    def _retire(self, now: float) -> None:
        with self._cv:
            keep: collections.deque[_Request] = collections.deque()
            dropped = []
            for req in self._queue:
                if req.cancelled or (req.deadline is not None and now >= req.deadline):
                    dropped.append(req)
                else:
                    keep.append(req)
            self._queue = keep
        for req in dropped:
            self._fail(req, *self._retire_reason(req))
        for req in list(self._running.values()):
            if req.cancelled or (req.deadline is not None and now >= req.deadline):
                self._fail(req, *self._retire_reason(req))

    @staticmethod
    def _retire_reason(req: _Request) -> tuple[str, str]:
        if req.cancelled:
            return "CANCELLED", "request cancelled"
        return "DEADLINE_EXCEEDED", "deadline exceeded before generation finished"

    def _admit(self) -> bool:
        if self.mode == "static":
            with self._cv:
                if not self._static_batch_ready():
                    return False
            limit = self.engine.max_slots
        else:
            limit = self.max_prefills_per_step or self.engine.max_slots
        admitted = False
        while self._free_slots and limit > 0:
            with self._cv:
                if not self._queue:
                    break
                req = self._queue.popleft()
            limit -= 1
            admitted = True
            try:
                prefix = self.engine.prefill(req.prompt_ids, req.params, req.seed)
            except Exception as e:
                log.exception("prefill failed for request %d", req.id)
                self._fail(req, "INTERNAL", f"prefill failed: {e}")
                continue
            slot = self._free_slots.pop()
            req.slot = slot
            self._running[slot] = req
            if self._on_token(req, prefix.first, 0, first=True):
                self._state = self.engine.insert(prefix, self._state, slot)
        return admitted

    def _on_token(self, req: _Request, out: StepOutput, row: int, *, first: bool = False) -> bool:
        """Handles one generated token; returns True while the request keeps running."""
        st = out.slot(row, req.params.logprobs)
        now = self._clock()
        req.generated += 1
        if first:
            req.first_token_time = now
            if self.metrics:
                self.metrics.ttft.observe(now - req.created)
        if self.metrics:
            self.metrics.generated_tokens.inc()
        emit = Output(token_ids=[st.token], logprobs=[st] if req.params.logprobs else [])
        if st.token in req.stop_ids:
            emit.text = req.stream.finish()
            emit.finish_reason, emit.matched_stop = "stop", str(st.token)
        else:
            emit.text, matched = req.stream.push(st.token)
            if matched is not None:
                emit.finish_reason, emit.matched_stop = "stop", matched
            elif req.generated >= req.params.max_tokens or st.done:
                emit.text += req.stream.finish()
                emit.finish_reason = "length"
        if emit.finish_reason:
            emit.prompt_tokens = len(req.prompt_ids)
            emit.completion_tokens = req.generated
            self._release(req, inserted=not first)
            if self.metrics:
                self.metrics.observe_finished(
                    ttft=req.first_token_time - req.created,
                    e2e=now - req.created,
                    tokens=req.generated,
                )
                self.metrics.count_request("OK")
        if not first and not emit.finish_reason and self.stream_interval > 1:
            req.unsent.append(emit)  # the first token and the last message go at once
            if len(req.unsent) < self.stream_interval:
                return True
            emit, req.unsent = merge_outputs(req.unsent), []
        self._deliver(req, emit)
        return not emit.finish_reason

    def _release(self, req: _Request, *, inserted: bool = True) -> None:
        if req.slot is None:
            return
        slot, req.slot = req.slot, None
        del self._running[slot]
        (self._finished_slots if inserted else self._free_slots).append(slot)
        if self.mode == "static" and self._running:
            return  # static batching: a batch keeps all its rows until its last member ends
        for slot in self._finished_slots:
            self._state = self.engine.free(self._state, slot)
            self._free_slots.append(slot)
        self._finished_slots.clear()

    def _fail(self, req: _Request, code: str, message: str, *, free: bool = True) -> None:
        self._release(req, inserted=free)
        if self.metrics:
            self.metrics.count_request(code)
        self._deliver(
            req,
            Output(
                error=RequestError(code, message),
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=req.generated,
            ),
        )

    def _deliver(self, req: _Request, out: Output) -> None:
        """Sends `out` with any tokens stream_interval held back in front (before an error,
        as a message of their own: what was generated before a failure is still delivered)."""
        if req.unsent:
            held, req.unsent = merge_outputs(req.unsent), []
            if out.error is None:
                out = merge_outputs([held, out])
            else:
                self._send(req, held)
        self._send(req, out)

    def _send(self, req: _Request, out: Output) -> None:
        try:
            req.sink(out)
        except Exception:
            log.exception("sink of request %d failed; cancelling it", req.id)
            req.cancelled = True

    def _abort_running(self, code: str, message: str) -> None:
        for req in list(self._running.values()):
            self._fail(req, code, message, free=False)  # the state is rebuilt below
        self._state = None  # a fresh one on the next step
        self._in_flight = None

    def _abort_all(self, code: str, message: str) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), collections.deque()
        for req in queued:
            self._fail(req, code, message)
        self._abort_running(code, message)
        self._set_gauges()

    def _set_gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.active_slots.set(len(self._running))
