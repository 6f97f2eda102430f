"""The engine contract the orchestrator drives (after JetStream's `engine_api.py`).

An engine owns device memory: model params and a KV cache of `max_slots` slots of
`max_len` positions. The orchestrator owns everything about requests. The split:

    prefix = engine.prefill(prompt_ids, sampling, seed)     # runs the prompt, samples token 1
    state  = engine.insert(prefix, state, slot)             # puts it into a free slot
    state, out = engine.generate(state)                     # one decode step for ALL slots
    state  = engine.free(state, slot)                       # slot may be reused

Every method has fixed shapes on the device (prompts padded to power-of-two buckets), so
after `warmup()` no call compiles. `generate` returns ONE packed array per step
(`StepOutput`), so the decode loop does a single device->host transfer per step, and it
may return before the step has run: reading the output is what waits.

Packed row layout (int32, one row per slot; float columns are float32 bit patterns):
    [token, length, done, logprob, top_ids[0:n], top_logprobs[0:n]]   n = max_logprobs
`length` is the position of `token` (= tokens already in the slot's cache); `done` is 1
when the slot cannot continue because `token` would not fit in its cache (length >=
max_len). A free slot's row is meaningless, and so are a row's logprob columns unless its
request asked for logprobs (an engine may skip computing them).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from tandem.serve.sampling import SamplingParams

TOKEN, LENGTH, DONE, LOGPROB, TOP = 0, 1, 2, 3, 4

State = TypeVar("State")


def row_width(max_logprobs: int) -> int:
    return TOP + 2 * max_logprobs


def pack_rows(
    tokens: Any,  # [B] int32
    lengths: Any,  # [B] int32
    done: Any,  # [B] bool
    logprob: Any,  # [B] float32
    top_ids: Any,  # [B, n] int32
    top_logprobs: Any,  # [B, n] float32
) -> Any:  # [B, row_width(n)] int32
    """Writes the packed layout (module docstring): inside a jitted step from jax arrays,
    or on the host from numpy arrays (the fake engine). `StepOutput` reads it."""
    if isinstance(tokens, np.ndarray):
        xp = np

        def bits(x: Any) -> Any:
            return np.asarray(x, np.float32).view(np.int32)
    else:
        xp = jnp

        def bits(x: Any) -> Any:
            return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)

    cols = [
        tokens[:, None],
        lengths[:, None],
        done.astype(xp.int32)[:, None],
        bits(logprob)[:, None],
    ]
    return xp.concatenate([*cols, top_ids.astype(xp.int32), bits(top_logprobs)], axis=1)


class TokenizerLike(Protocol):
    """What serving needs from a tokenizer (model.tokenizer.Tokenizer satisfies it)."""

    vocab_size: int
    bos_id: int | None  # None: the model has no BOS token (Qwen)
    eos_id: int  # the tokenizer's own EOS (ModelInfo reports it; stopping uses stop_ids)
    stop_ids: frozenset[int]  # every id that ends generation (EOS + generation_config's)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class SlotToken:
    """One generated token of one slot, unpacked on the host."""

    token: int
    length: int
    done: bool
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


class StepOutput:
    """One packed step, int32 [B, row_width(max_logprobs)] (see the module docstring).

    Built from a device array it starts the device->host copy at once but only waits for
    it when `data` is first read, so the orchestrator can dispatch the next step before
    reading this one (host work then overlaps device work).
    """

    def __init__(self, rows: Any, max_logprobs: int) -> None:
        self._rows = rows
        self.max_logprobs = max_logprobs
        start_copy = getattr(rows, "copy_to_host_async", None)
        if start_copy is not None:
            start_copy()

    @functools.cached_property
    def data(self) -> np.ndarray:
        return np.asarray(self._rows)

    def slot(self, b: int, top_n: int = 0) -> SlotToken:
        row = self.data[b]
        n = self.max_logprobs
        floats = row.view(np.float32)
        top_n = min(top_n, n)
        top = tuple((int(row[TOP + i]), float(floats[TOP + n + i])) for i in range(top_n))
        return SlotToken(
            token=int(row[TOKEN]),
            length=int(row[LENGTH]),
            done=bool(row[DONE]),
            logprob=float(floats[LOGPROB]),
            top=top,
        )


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A prefilled prompt ready for `insert`: device KV plus the first sampled token.

    `first` is a one-row StepOutput (already on the host: the first token is what TTFT
    measures, so it is fetched right away). `kv` and `extra` are engine-private.
    """

    first: StepOutput
    prompt_len: int
    kv: Any = None
    extra: Any = None


class Engine(abc.ABC, Generic[State]):
    """Fixed-shape prefill/insert/generate/free over a slot KV cache. See module docstring.

    Implementations must be usable from one thread at a time (the orchestrator's loop).
    """

    max_slots: int
    max_len: int  # positions per slot: prompt + generated tokens
    max_prompt_len: int
    max_logprobs: int
    tokenizer: TokenizerLike

    @abc.abstractmethod
    def warmup(self) -> None:
        """Compiles every shape the engine will ever run (all prefill buckets, insert,
        generate, free). After it returns, no request may trigger a compile."""

    @abc.abstractmethod
    def init_state(self) -> State:
        """A decode state with every slot free."""

    @abc.abstractmethod
    def prefill(self, tokens: Sequence[int], sampling: SamplingParams, seed: int) -> Prefix:
        """Runs the prompt (1 <= len(tokens) <= max_prompt_len) and samples its first token
        with `sampling` and `seed` (the token's key comes from (seed, position))."""

    @abc.abstractmethod
    def insert(self, prefix: Prefix, state: State, slot: int) -> State:
        """Writes a prefix into free `slot`; the slot then decodes on every `generate`."""

    @abc.abstractmethod
    def generate(self, state: State) -> tuple[State, StepOutput]:
        """One decode step for every occupied slot; returns the packed per-slot tokens
        (possibly still being computed: `StepOutput.data` waits for them)."""

    @abc.abstractmethod
    def free(self, state: State, slot: int) -> State:
        """Marks `slot` free; its row in later StepOutputs is ignored until reinserted."""

    def info(self) -> dict[str, Any]:
        """What ModelInfo reports beyond the limits (config, manifest, backend ...)."""
        return {}

    def prefill_buckets(self) -> tuple[int, ...]:
        return ()


def prefill_buckets(max_prompt_len: int, min_bucket: int = 16) -> tuple[int, ...]:
    """Powers of two from min_bucket up to the first one >= max_prompt_len (capped there)."""
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} is invalid: must be >= 1")
    buckets = []
    b = max(1, min_bucket)
    while b < max_prompt_len:
        buckets.append(b)
        b *= 2
    buckets.append(max_prompt_len if b > max_prompt_len else b)
    return tuple(buckets)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt length {length} exceeds the largest prefill bucket {buckets[-1]}")
