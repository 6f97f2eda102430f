"""A tiny host-only Engine for orchestrator/server tests and the serving docs' examples.

It "generates" by a script: by default it echoes the prompt's tokens (BOS dropped) and then
emits EOS, so a test controls the exact token stream through the prompt alone (with a byte
tokenizer, every UTF-8 byte is its own token, which exercises split characters and stop
strings that straddle tokens). It honours the Engine contract's shapes and bookkeeping —
lengths, the done flag at a full cache, the packed StepOutput — and counts calls so tests
can check continuous batching and slot reuse.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from tandem.serve.engine_api import (
    Engine,
    Prefix,
    StepOutput,
    TokenizerLike,
    pack_rows,
    prefill_buckets,
    row_width,
)
from tandem.serve.sampling import SamplingParams

Script = Callable[[Sequence[int], int], int]  # (prompt ids, output index) -> token id


class FakeState:
    """Per-slot host bookkeeping; mutable, but handed around like a device state."""

    def __init__(self, slots: int) -> None:
        self.lengths = np.zeros(slots, np.int32)
        self.active = np.zeros(slots, bool)
        self.prompts: list[list[int]] = [[] for _ in range(slots)]
        self.produced = np.zeros(slots, np.int32)  # tokens emitted so far per slot


class FakeEngine(Engine[FakeState]):
    def __init__(
        self,
        tokenizer: TokenizerLike,
        *,
        max_slots: int = 4,
        max_len: int = 128,
        max_prompt_len: int = 64,
        max_logprobs: int = 2,
        step_delay: float = 0.0,
        prefill_delay: float = 0.0,
        script: Script | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_slots = max_slots
        self.max_len = max_len
        self.max_prompt_len = max_prompt_len
        self.max_logprobs = max_logprobs
        self.step_delay = step_delay
        self.prefill_delay = prefill_delay
        self.script = script or self._echo
        self.warm = False
        self.prefill_calls = 0
        self.generate_calls = 0
        self.max_active = 0
        self.active_history: list[int] = []  # active slot count at each generate call
        self._lock = threading.Lock()

    def _echo(self, prompt: Sequence[int], index: int) -> int:
        body = [t for t in prompt if t != self.tokenizer.bos_id]
        return body[index] if index < len(body) else self.tokenizer.eos_id

    def warmup(self) -> None:
        self.warm = True

    def init_state(self) -> FakeState:
        return FakeState(self.max_slots)

    def prefill_buckets(self) -> tuple[int, ...]:
        return prefill_buckets(self.max_prompt_len)

    def _row(self, token: int, length: int) -> np.ndarray:
        n = np.arange(self.max_logprobs)
        return pack_rows(
            np.asarray([token], np.int32),
            np.asarray([length], np.int32),
            np.asarray([length >= self.max_len]),
            np.asarray([-0.5], np.float32),
            ((token + n) % self.tokenizer.vocab_size)[None],
            (-0.5 - n)[None],
        )[0]

    def prefill(self, tokens: Sequence[int], sampling: SamplingParams, seed: int) -> Prefix:
        if not 1 <= len(tokens) <= self.max_prompt_len:
            raise ValueError(f"prompt length {len(tokens)} outside [1, {self.max_prompt_len}]")
        if self.prefill_delay:
            time.sleep(self.prefill_delay)
        self.prefill_calls += 1
        first = self.script(list(tokens), 0)
        row = self._row(first, len(tokens))
        return Prefix(
            first=StepOutput(row[None], self.max_logprobs),
            prompt_len=len(tokens),
            kv=list(tokens),
        )

    def insert(self, prefix: Prefix, state: FakeState, slot: int) -> FakeState:
        if state.active[slot]:
            raise RuntimeError(f"insert into occupied slot {slot}")
        state.active[slot] = True
        state.lengths[slot] = prefix.prompt_len
        state.prompts[slot] = list(prefix.kv)
        state.produced[slot] = 1
        return state

    def generate(self, state: FakeState) -> tuple[FakeState, StepOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        self.generate_calls += 1
        n_active = int(state.active.sum())
        self.active_history.append(n_active)
        self.max_active = max(self.max_active, n_active)
        rows = np.zeros((self.max_slots, row_width(self.max_logprobs)), np.int32)
        for b in np.flatnonzero(state.active):
            state.lengths[b] += 1
            token = self.script(state.prompts[b], int(state.produced[b]))
            state.produced[b] += 1
            rows[b] = self._row(token, int(state.lengths[b]))
        return state, StepOutput(rows, self.max_logprobs)

    def free(self, state: FakeState, slot: int) -> FakeState:
        state.active[slot] = False
        state.lengths[slot] = 0
        state.prompts[slot] = []
        return state

    def info(self) -> dict:
        return {"backend": "fake", "config": {"vocab_size": self.tokenizer.vocab_size}}
