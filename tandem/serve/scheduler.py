"""The token-budget scheduler over request states (after vLLM v1's `sched/scheduler.py`).

There is no prefill phase and no decode phase: each request has `num_computed_tokens` (its
leading tokens whose K/V are in the cache) and the step catches them up with its
`num_tokens` (prompt + generated). `schedule()` builds ONE step within
`max_num_batched_tokens`:
  1. the decode token of every running sequence whose prompt is done;
  2. the next chunk of the one running sequence still prefilling its prompt, if any
     (chunked prefill: a long prompt runs in pieces over several steps while the others
     decode);
  3. waiting requests in arrival order, each starting after its longest cached prefix
     (serve.kv_cache; none for a request that asked for prompt logprobs: each prompt
     position must be computed to be scored, though its pages are still published), as
     many as the admission policy, `max_seqs` and the budget allow (several short
     prompts share one step; the last may get only a first chunk). A request whose next
     full pages another running sequence is computing right now waits (keeping its
     place) until they are published, then starts after them: a prefix shared by
     requests that arrive together (the n choices of one prompt, a burst with one system
     prompt) is computed once, not once per request.
Running sequences are visited in admission order, as vLLM does, and that alone puts every
decode first: only the last request admitted can be left mid-prompt, and the budget (at
least `max_seqs`) always holds a token for each running sequence.
When the pool has no page for a running sequence, the newest running sequence not yet in
this step is preempted: its pages are freed (their published prefix stays cached), it goes
back to the front of the queue and is later recomputed from its prompt plus the tokens it
has generated, which, as sampling keys depend only on (seed, position), continues exactly
as it would have. No waiting request is admitted in a step that preempted.

The plan (`SchedulerOutput`) gives the engine exact numpy arrays, row by row, for the
ragged paged-attention contract (q rows, `kv_lens`, `page_indices`, `cu_q_lens`,
`slot_mapping`); the engine pads them to its compiled buckets. A row's sampled token is
at position `kv_lens[row]`, and only rows with `sample[row]` produce one (a prompt chunk
that does not reach the end of the prompt does not). `update_from_output` commits the
step: it publishes the pages the step completed, appends each sampled token, applies
`check_stop` and frees what finished.

A sampled token is in flight from the `schedule()` that plans it to the
`update_from_output` that commits it (`Request.num_output_placeholders`). With async
scheduling (ServeConfig, the default) the serving loop plans step N+1 while step N runs,
as vLLM's `--async-scheduling` does (without it, it commits each step before planning the
next): then a request whose token N samples continues in N+1 from that token's plan row
(`token_sources`; the engine reads it on device), never past its max_tokens or max_len,
and not at all while it has a grammar (its next bitmask needs the token). A request that
N's commit ends (a stop token, a stop string) or that N+1's planning preempts has its N+1
row ignored: that work is lost, never its output. Not thread-safe: the serving loop owns
it; stop *strings* stay with the detokenizer (serve.detok), which ends a request through
`finish_requests`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tandem.config import require
from tandem.serve.config import ServeConfig
from tandem.serve.kv_cache import NULL_PAGE, KVCacheManager
from tandem.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from tandem.serve.structured import GrammarMatcher

log = logging.getLogger(__name__)


class FinishReason(enum.StrEnum):
    """Why a request ended; the values are the API's finish_reason strings."""

    STOP = "stop"  # a stop token (or, from the detokenizer, a stop string)
    LENGTH = "length"  # max_tokens, or max_len
    ABORT = "abort"  # cancelled, deadline, shutdown, engine failure


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the queue, to be recomputed
    # every status after PREEMPTED is finished
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _REASONS.get(self)


_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}
_STATUS_OF = {reason: status for status, reason in _REASONS.items()}


class Request:
    """One generation request as the scheduler tracks it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        seed: int,
        eos_token_ids: Collection[int] = (),
        grammar: GrammarMatcher | None = None,
    ) -> None:
        self.request_id = request_id
        # advanced with each committed token; a preempted request keeps its tokens, so
        # its matcher stays right through the recompute (tandem/serve/structured.py)
        self.grammar = grammar
        self.sampling = sampling
        self.seed = seed  # resolved: the sampler's key is f(seed, position)
        self.max_tokens = sampling.max_tokens
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop |= set(eos_token_ids)  # a model may have several (generation_config.json)
        self.stop_token_ids = frozenset(stop)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)  # prompt + output; appended to only
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # tokens planned steps sample that `update_from_output` has not committed yet (at
        # most 2: async scheduling plans step N+1 before committing N); `sample_row` is
        # the row of the newest plan that samples one
        self.num_output_placeholders = 0
        self.sample_row = -1
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_preemptions = 0
        self.arrival_time = 0.0  # set by Scheduler.add_request

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_planned(self) -> int:
        """num_tokens plus the tokens in flight: what the next step continues from."""
        return len(self.all_token_ids) + self.num_output_placeholders

    def may_continue(self, max_len: int) -> bool:
        """Whether a step may be planned past its tokens in flight: not once they reach
        max_tokens or max_len (it ends there), nor for a grammar, whose next bitmask needs
        the token in flight."""
        if not self.num_output_placeholders:
            return True
        return (
            self.grammar is None
            and self.num_output_tokens + self.num_output_placeholders < self.max_tokens
            and self.num_tokens_planned < max_len
        )

    @property
    def sampled_output_index(self) -> int:
        """Index among its outputs of the token its newest plan samples, i.e. how many
        outputs come before it: those committed plus those in flight ahead of it (the
        plan's own is one of `num_output_placeholders`)."""
        return self.num_output_tokens + self.num_output_placeholders - 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.all_token_ids.append(token)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


def check_stop(request: Request, max_len: int) -> FinishReason | None:
    """Whether the request's last generated token ends it (a pure function; vLLM's
    `check_stop`): a stop token id (the model's EOS ids unless ignore_eos, and the request's
    own) or a finished grammar (its EOS accepted, even with ignore_eos), then max_tokens,
    then the per-sequence cap `max_len`."""
    if request.output_token_ids[-1] in request.stop_token_ids:
        return FinishReason.STOP
    if request.grammar is not None and request.grammar.finished:
        return FinishReason.STOP
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_len:
        return FinishReason.LENGTH
    return None


# ---- admission --------------------------------------------------------------------------


class AdmissionPolicy(abc.ABC):
    """Which waiting requests may start: the one difference between continuous and static
    batching. Preempted requests always resume (they belong to what is running)."""

    # Whether a request whose next full pages another sequence is computing waits for
    # them (continuous: it starts a step or two later and computes them once) or starts
    # with the others, computing its own copy (static: a batch starts together).
    waits_for_shared_pages = True

    @abc.abstractmethod
    def admit_limit(
        self, *, num_active: int, waiting: Sequence[Request], now: float, draining: bool
    ) -> int:
        """How many new requests may start this step. `num_active`: requests running or
        preempted; `waiting`: the queue, oldest first; `draining`: no more will arrive."""


class ContinuousAdmission(AdmissionPolicy):
    """Any step may admit (up to `max_prefills_per_step` new requests, 0 = no limit)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.limit = cfg.max_prefills_per_step or cfg.max_seqs

    def admit_limit(
        self, *, num_active: int, waiting: Sequence[Request], now: float, draining: bool
    ) -> int:
        return self.limit


class StaticAdmission(AdmissionPolicy):
    """The benchmark baseline: a batch of up to `max_seqs` starts together, once full or
    once its oldest request waited `static_batch_wait_s`, and nothing starts until its last
    member ends. (Unlike a padded static batch, finished members cost the step nothing.)"""

    waits_for_shared_pages = False

    def __init__(self, cfg: ServeConfig) -> None:
        self.batch = cfg.max_seqs
        self.wait_s = cfg.static_batch_wait_s

    def admit_limit(
        self, *, num_active: int, waiting: Sequence[Request], now: float, draining: bool
    ) -> int:
        if num_active or not waiting:
            return 0
        full = len(waiting) >= self.batch
        return self.batch if full or draining or now - waiting[0].arrival_time >= self.wait_s else 0


def admission_policy(cfg: ServeConfig) -> AdmissionPolicy:
    return {"continuous": ContinuousAdmission, "static": StaticAdmission}[cfg.mode](cfg)


# ---- the step plan ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step for the engine: R rows (decode rows first, then prompt chunks), T tokens.

    Arrays are exact (the engine pads): a row's tokens are
    `token_ids[cu_q_lens[r]:cu_q_lens[r + 1]]` at `positions` `num_computed_tokens[r]` ..
    `kv_lens[r] - 1`; their K/V go to `slot_mapping` (page * page_size + offset) and the row
    attends to its first `kv_lens[r]` cached positions through `page_indices[r]` (entries
    past `ceil(kv_lens[r] / page_size)` are the null page 0).
    """

    requests: tuple[Request, ...]  # [R] the row's request (sampling params, seed)
    token_ids: np.ndarray  # [T] int32
    # [T] int32: -1, or the row of the previous plan whose sampled token this is (its id
    # in token_ids is 0: async scheduling planned this step before committing that one)
    token_sources: np.ndarray
    positions: np.ndarray  # [T] int32
    cu_q_lens: np.ndarray  # [R + 1] int32
    num_computed_tokens: np.ndarray  # [R] int32: cached before this step
    kv_lens: np.ndarray  # [R] int32: cached after this step's writes
    page_indices: np.ndarray  # [R, W] int32, W = the most pages a row needs
    slot_mapping: np.ndarray  # [T] int32
    sample: np.ndarray  # [R] bool: the row's last token's logits give its next token
    preempted: tuple[Request, ...]  # sent back to the queue while building this step

    @property
    def num_rows(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_q_lens[-1])

    @property
    def logits_indices(self) -> np.ndarray:  # [R] int32
        """The token whose logits each row samples from: its last."""
        return self.cu_q_lens[1:] - 1


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A request's token from one step (`row` of the plan: where its logprobs are)."""

    request: Request
    row: int
    token: int
    finish_reason: FinishReason | None


# ---- the scheduler ----------------------------------------------------------------------


class Scheduler:
    """Request states, the KV-cache manager and the admission policy of one replica."""

    def __init__(
        self,
        cfg: ServeConfig,
        *,
        cache_key: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require(cfg.max_len > 0, "max_len", cfg.max_len, "> 0 here: resolve the config first")
        self.cfg = cfg
        self.max_len = cfg.max_len
        self.max_prompt_len = cfg.max_prompt_len or cfg.max_len - 1
        self.page_size = cfg.page_size
        self.kv = KVCacheManager(cfg, cache_key=cache_key)
        require(cfg.page_size > 0, "page_size", 0, "> 0 here: resolve the config first")
        self.policy = admission_policy(cfg)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order: the last is the next preempted
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.draining = False  # set when no more requests will arrive (static: run now)
        self.num_preemptions = 0
        self._clock = clock

    # ---- requests in and out --------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Rejects a request that could never run (ValueError naming the field)."""
        n = num_prompt_tokens
        require(n >= 1, "prompt_token_ids", "[]", "at least one token")
        require(
            n <= self.max_prompt_len,
            "prompt_token_ids",
            f"<{n} tokens>",
            f"at most max_prompt_len={self.max_prompt_len} tokens (prompts are never cut)",
        )
        require(
            n + max_tokens <= self.max_len,
            "max_tokens",
            max_tokens,
            f"<= {self.max_len - n}: prompt ({n} tokens) + max_tokens <= max_len {self.max_len}",
        )
        capacity = self.kv.num_usable_pages * self.page_size  # positions; the last token
        pool = f"({self.kv.num_usable_pages} pages of {self.page_size}; kv_cache_tokens)"
        require(  # of a request is sampled, never cached
            n <= capacity,
            "prompt_token_ids",
            f"<{n} tokens>",
            f"at most {capacity} tokens with max_tokens 1: the whole KV cache {pool}",
        )
        require(
            n + max_tokens - 1 <= capacity,
            "max_tokens",
            max_tokens,
            f"<= {capacity + 1 - n}: prompt ({n} tokens) + max_tokens must fit the whole KV "
            f"cache {pool}",
        )

    def add_request(self, request: Request) -> None:
        """Queues a request (ValueError if it could never run or its id is in use)."""
        require(
            request.request_id not in self.requests,
            "request_id",
            request.request_id,
            "an id not in use",
        )
        self.check_fits(request.num_prompt_tokens, request.max_tokens)
        request.arrival_time = self._clock()
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(
        self, request_ids: Iterable[str], reason: FinishReason = FinishReason.ABORT
    ) -> list[Request]:
        """Ends requests from outside the step (cancel, deadline, a stop string): frees
        their pages at once. Unknown or finished ids are ignored; returns those ended."""
        ended = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self._finish(request, _STATUS_OF[reason])
                ended.append(request)
        return ended

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def ready(self) -> bool:
        """Whether `schedule()` would run anything now (a static batch may be waiting to
        fill: the loop then sleeps a little and asks again)."""
        if self.running or any(r.status == RequestStatus.PREEMPTED for r in self.waiting):
            return True
        return bool(self.waiting) and self._admit_limit() > 0

    def _admit_limit(self) -> int:
        preempted = sum(1 for r in self.waiting if r.status == RequestStatus.PREEMPTED)
        return self.policy.admit_limit(
            num_active=len(self.running) + preempted,
            waiting=self.waiting,
            now=self._clock(),
            draining=self.draining,
        )

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Builds the next step (module docstring) and counts its tokens as computed."""
        budget = self.cfg.max_num_batched_tokens
        rows: list[tuple[Request, int]] = []
        in_step: set[str] = set()
        preempted: list[Request] = []

        def place(request: Request, num_new_tokens: int) -> None:
            nonlocal budget
            rows.append((request, num_new_tokens))
            in_step.add(request.request_id)
            budget -= num_new_tokens

        for request in list(self.running):  # 1 and 2: running sequences, oldest first
            if request.status != RequestStatus.RUNNING or not request.may_continue(self.max_len):
                continue  # preempted by an older one in this loop, or ending in flight
            n = min(request.num_tokens_planned - request.num_computed_tokens, budget)
            if n > 0 and self._allocate_or_preempt(request, n, in_step, preempted):
                place(request, n)
        if not preempted:  # 3. waiting requests
            limit = self._admit_limit()
            deferred: list[Request] = []
            # a deferred request keeps its seat: a later arrival may start beside it, never
            # in its place (else it would wait for that request's whole generation)
            while (
                self.waiting
                and budget > 0
                and len(self.running) + len(deferred) < self.cfg.max_seqs
            ):
                request = self.waiting[0]
                resumed = request.status == RequestStatus.PREEMPTED
                if not resumed and limit == 0:
                    break
                # positions served from the prefix cache are never computed, so they would
                # have no prompt logprobs (vLLM skips the cache for these requests too)
                scored = request.sampling.prompt_logprobs is not None
                hit = None if scored else self.kv.lookup(request)
                if (
                    hit is not None
                    and hit.num_pending_tokens
                    and self.policy.waits_for_shared_pages
                ):
                    # its next pages are being computed: wait for them rather than compute
                    # them twice (n choices of one prompt, a shared system prompt)
                    deferred.append(self.waiting.popleft())
                    continue
                cached = 0 if hit is None else hit.num_tokens
                n = min(request.num_tokens - cached, budget)
                if self.kv.allocate(request, n, hit) is None:
                    break  # wait for pages to free up
                self.waiting.popleft()
                if not resumed:
                    limit -= 1
                    request.num_cached_tokens = cached
                request.num_computed_tokens = cached
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                place(request, n)
            self.waiting.extendleft(reversed(deferred))  # their places in the queue
        plan = self._plan(rows, preempted)
        sampled = plan.sample.tolist()
        for row, (request, n) in enumerate(rows):
            request.num_computed_tokens += n
            if sampled[row]:
                request.num_output_placeholders += 1
                request.sample_row = row
        return plan

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, in_step: set[str], preempted: list[Request]
    ) -> bool:
        """Pages for a running request's next tokens, preempting the newest running request
        not in this step until they fit; False if that had to be the request itself."""
        while self.kv.allocate(request, num_new_tokens) is None:
            victim = next(r for r in reversed(self.running) if r.request_id not in in_step)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # its token in flight is dropped: recomputed
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # the newest goes first, so older ones end up ahead

    def _plan(self, rows: list[tuple[Request, int]], preempted: list[Request]) -> SchedulerOutput:
        # Python lists, converted once: per-row numpy calls would cost more than the lists
        # for the many one-token decode rows of a typical step.
        size = self.page_size
        tables, tokens, sources, positions, slots = [], [], [], [], []
        for request, n in rows:
            pages, start = self.kv.pages_of(request.request_id), request.num_computed_tokens
            tables.append(pages)
            known = request.all_token_ids[start : start + n]
            tokens += known
            sources += [-1] * len(known)
            if len(known) < n:  # the one token in flight: the previous plan samples it
                # (every older step is committed before this plan is made)
                tokens.append(0)
                sources.append(request.sample_row)
            span = range(start, start + n)
            positions += span
            slots += [pages[p // size] * size + p % size for p in span]
        q_lens = np.array([n for _, n in rows], np.int32)  # [R]
        cu_q_lens = np.zeros(len(rows) + 1, np.int32)  # [R + 1]
        cu_q_lens[1:] = np.cumsum(q_lens)
        computed = np.array([r.num_computed_tokens for r, _ in rows], np.int32)  # [R]
        width = max(map(len, tables), default=0)
        padded = [t + [NULL_PAGE] * (width - len(t)) for t in tables]
        return SchedulerOutput(
            requests=tuple(r for r, _ in rows),
            token_ids=np.array(tokens, np.int32),  # [T]
            token_sources=np.array(sources, np.int32),  # [T]
            positions=np.array(positions, np.int32),  # [T]
            cu_q_lens=cu_q_lens,
            num_computed_tokens=computed,
            kv_lens=computed + q_lens,
            page_indices=np.array(padded, np.int32).reshape(len(rows), width),  # [R, W]
            slot_mapping=np.array(slots, np.int32),  # [T]
            sample=np.array(
                [r.num_computed_tokens + n == r.num_tokens_planned for r, n in rows], bool
            ),
            preempted=tuple(preempted),
        )

    def update_from_output(
        self, plan: SchedulerOutput, sampled_token_ids: Sequence[int] | np.ndarray
    ) -> list[RequestOutput]:
        """Commits a step that ran: `sampled_token_ids[row]` is each row's sampled token
        (ignored where `plan.sample` is False). Returns one output per generated token;
        requests that finish are freed. Rows of requests ended since the plan are skipped."""
        outputs = []
        kv_lens, sample = plan.kv_lens.tolist(), plan.sample.tolist()
        for row, request in enumerate(plan.requests):
            if request.status != RequestStatus.RUNNING:
                continue
            self.kv.cache_pages(request, kv_lens[row])
            if not sample[row]:
                continue
            token = int(sampled_token_ids[row])
            request.num_output_placeholders -= 1
            request.append_output_token(token)
            if request.grammar is not None and not request.grammar.accept(token):
                log.error(  # the bitmask allows only what the grammar accepts
                    "request %s: token %d outside its grammar (%s); ending it",
                    request.request_id, token, request.grammar.error,
                )  # fmt: skip
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                outputs.append(RequestOutput(request, row, token, FinishReason.STOP))
                continue
            reason = check_stop(request, self.max_len)
            if reason is not None:
                self._finish(request, _STATUS_OF[reason])
            outputs.append(RequestOutput(request, row, token, reason))
        return outputs
