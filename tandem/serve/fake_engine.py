"""A tiny host-only Engine for orchestrator/server tests and the serving docs' examples.

It "generates" by a script: by default it echoes the prompt's tokens (BOS dropped) and then
emits EOS, so a test controls the exact token stream through the prompt alone (with a byte
tokenizer, every UTF-8 byte is its own token, which exercises split characters and stop
strings that straddle tokens). It runs real scheduler plans: it checks that each row's
tokens are its request's next ones, answers the rows that sample with the script's next
token (under a request's grammar: that token if the grammar allows it, else the lowest id
it allows) and packs a StepOutput (with prompt logprobs, each prompt token scored -0.25 and
ranked first, when a request asked), and counts steps and rows so tests can check continuous
batching, chunked prefill and preemption. It holds no cache, so any page table is fine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from tandem.serve.config import ServeConfig
from tandem.serve.engine_api import Engine, StepOutput, TokenizerLike, pack_rows, prompt_targets
from tandem.serve.kv_cache import pages_for
from tandem.serve.scheduler import SchedulerOutput
from tandem.serve.structured import allows, fill_bitmask

Script = Callable[[Sequence[int], int], int]  # (prompt ids, output index) -> token id

MODEL_MAX_LEN = 128  # what max_len=0 resolves to


class FakeEngine(Engine):
    def __init__(
        self,
        tokenizer: TokenizerLike,
        serve_cfg: ServeConfig | None = None,
        *,
        step_delay: float = 0.0,
        script: Script | None = None,
    ) -> None:
        """`serve_cfg` as for JaxEngine (the fake model's context is max_len, 128 when 0;
        pages of 16 unless set; kv_cache_tokens 0 = room for max_seqs full-length
        sequences)."""
        scfg = serve_cfg or ServeConfig(max_seqs=4, max_prompt_len=64)
        scfg = scfg.resolve(scfg.max_len or MODEL_MAX_LEN, default_page_size=16)
        if not scfg.kv_cache_tokens:
            pages = scfg.max_seqs * pages_for(scfg.max_len, scfg.page_size) + 1  # + null page
            tokens = pages * scfg.page_size
            scfg = dataclasses.replace(scfg, kv_cache_tokens=tokens)
        self.serve_cfg = scfg
        self.tokenizer = tokenizer
        self.cache_key = b"fake"
        self.step_delay = step_delay
        self.script = script or self._echo
        self.warm = False
        self.step_calls = 0
        self.rows_history: list[int] = []  # rows of each step
        self.tokens_history: list[int] = []  # tokens of each step
        self.prompt_starts = 0  # rows computing a prompt from its first token (a prefix-
        # cache hit starts later; a preempted request starts again)

    @property
    def max_active(self) -> int:
        """The most rows (running sequences) a step held."""
        return max(self.rows_history, default=0)

    def _echo(self, prompt: Sequence[int], index: int) -> int:
        body = [t for t in prompt if t != self.tokenizer.bos_id]
        return body[index] if index < len(body) else self.tokenizer.eos_id

    def warmup(self) -> None:
        self.warm = True

    def token_buckets(self) -> tuple[int, ...]:
        return (self.serve_cfg.max_num_batched_tokens,)

    def step(self, plan: SchedulerOutput) -> StepOutput:
        if self.step_delay:
            time.sleep(self.step_delay)
        self.step_calls += 1
        self.rows_history.append(plan.num_rows)
        self.tokens_history.append(plan.num_tokens)
        tokens = np.zeros(plan.num_rows, np.int32)
        bitmask = fill_bitmask(plan, plan.num_rows, self.tokenizer.vocab_size)
        for r, request in enumerate(plan.requests):
            lo, hi = plan.cu_q_lens[r], plan.cu_q_lens[r + 1]
            start = int(plan.num_computed_tokens[r])
            self.prompt_starts += start == 0
            known = request.all_token_ids[start : start + hi - lo]  # the rest: in flight
            if plan.token_ids[lo : lo + len(known)].tolist() != known or any(
                plan.token_sources[lo + len(known) : hi] < 0
            ):
                raise RuntimeError(f"row {r} of the plan does not continue {request}")
            if plan.sample[r]:
                tokens[r] = self.script(request.prompt_token_ids, request.sampled_output_index)
                if bitmask is not None and not allows(bitmask[r], int(tokens[r])):
                    bits = np.unpackbits(bitmask[r].view(np.uint8), bitorder="little")
                    tokens[r] = int(np.flatnonzero(bits)[0])
        n = np.arange(self.max_logprobs)
        rows = pack_rows(
            tokens,
            plan.kv_lens.astype(np.int32),
            np.full(plan.num_rows, -0.5, np.float32),
            (tokens[:, None] + n) % self.tokenizer.vocab_size,
            np.broadcast_to(-0.5 - n, (plan.num_rows, self.max_logprobs)),
        )
        prompt_rows = None
        if any(r.sampling.prompt_logprobs is not None for r in plan.requests):
            targets = np.full(plan.num_tokens, -1, np.int32)
            for r, request in enumerate(plan.requests):
                if request.sampling.prompt_logprobs is not None:
                    prompt_targets(request.prompt_token_ids, plan, r, targets)
            t = plan.num_tokens  # each prompt token scored -0.25, rank 1 (and n after it)
            prompt_rows = pack_rows(
                targets,
                np.ones(t, np.int32),
                np.full(t, -0.25, np.float32),
                (targets[:, None] + n) % self.tokenizer.vocab_size,
                np.broadcast_to(-0.25 - n, (t, self.max_logprobs)),
            )
        return StepOutput(rows, self.max_logprobs, prompt_rows)

    def reset(self) -> None:
        pass

    def info(self) -> dict:
        return {"backend": "fake", "config": {"vocab_size": self.tokenizer.vocab_size}}
