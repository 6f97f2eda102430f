"""The engine contract the serving loop drives: one step of a scheduler plan at a time.

An engine owns device memory: the model's params and the paged KV cache (a pool of
`serve_cfg.num_pages` pages). The scheduler (tandem/serve/scheduler.py) owns everything about
requests and pages; the engine only runs what it is told:

    engine.warmup()                   # compiles every shape it will ever run
    out = engine.step(plan)           # one forward over the plan's rows, one token per row
    tokens = out.tokens(plan.num_rows)
    scheduler.update_from_output(plan, tokens)

`step` runs a `SchedulerOutput` (decode rows and prompt chunks together) in one compiled
call: the plan's shapes are padded to buckets fixed at construction, so after `warmup()`
no request triggers a compile. It writes the rows' K/V into the pages the plan names and
samples one token per row on the device with the row's own parameters, the random key a
function of (seed, position) only, so a seeded request's tokens depend neither on its
batch neighbours nor on how its prompt was chunked or whether it was preempted. A row
whose `plan.sample` is False (a prompt chunk short of the prompt's end) gets a token that
the scheduler ignores.

The step returns ONE packed array (`StepOutput`), so the loop does a single device->host
transfer per step. Packed row layout (int32, one row per plan row; float columns are
float32 bit patterns):
    [token, position, logprob, top_ids[0:n], top_logprobs[0:n]]   n = max_logprobs
`position` is where `token` sits in its sequence (= the row's kv_len). A row's logprob
columns are meaningless unless its request asked for logprobs (an engine may skip them).

Prompt logprobs (a request's `SamplingParams.prompt_logprobs`) come as a second array,
one row per plan TOKEN, that the engine returns only for a plan with such a request
(`StepOutput.prompt_rows`; it stays on the device otherwise):
    [target, rank, logprob, top_ids[0:n], top_logprobs[0:n]]
`target` is the prompt token after that token (the one scored, at the token's position
+ 1) and `rank` its rank in the vocabulary (1 = the most likely); a token whose request
did not ask, or whose next token is not a prompt token, has meaningless columns.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from tandem.serve.config import ServeConfig
    from tandem.serve.scheduler import SchedulerOutput

TOKEN, POSITION, LOGPROB, TOP = 0, 1, 2, 3


def row_width(max_logprobs: int) -> int:
    return TOP + 2 * max_logprobs


def pack_rows(
    tokens: Any,  # [R] int32
    positions: Any,  # [R] int32
    logprob: Any,  # [R] float32
    top_ids: Any,  # [R, n] int32
    top_logprobs: Any,  # [R, n] float32
) -> Any:  # [R, row_width(n)] int32
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

    cols = [tokens[:, None], positions[:, None], bits(logprob)[:, None]]
    return xp.concatenate([*cols, top_ids.astype(xp.int32), bits(top_logprobs)], axis=1)


def prompt_targets(prompt: list[int], plan: SchedulerOutput, row: int, targets: np.ndarray) -> None:
    """Writes into `targets` [Tb] the prompt token after each of the row's tokens (where
    that token is still in the prompt): the token whose logprob the step scores there. A
    chunk's last token scores the first token of the next chunk, which the host knows."""
    lo, hi = plan.cu_q_lens[row], plan.cu_q_lens[row + 1]
    after = plan.positions[lo:hi] + 1  # [n] positions of the tokens scored
    inside = after < len(prompt)
    targets[lo:hi][inside] = np.asarray(prompt, np.int32)[after[inside]]


class TokenizerLike(Protocol):
    """What serving needs from a tokenizer (model.tokenizer.Tokenizer satisfies it)."""

    vocab_size: int
    bos_id: int | None  # None: the model has no BOS token (Qwen)
    eos_id: int  # the tokenizer's own EOS (ModelInfo reports it; stopping uses stop_ids)
    stop_ids: frozenset[int]  # every id that ends generation (EOS + generation_config's)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class RowToken:
    """One plan row's generated token, unpacked on the host."""

    token: int
    position: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
    rank: int = 0  # of a prompt token: its rank in the vocabulary (1 = most likely)


class StepOutput:
    """One packed step, int32 [R, row_width(max_logprobs)] (see the module docstring),
    R >= the plan's rows (an engine may return padding rows after them).

    `prompt_rows`: the prompt-logprob rows of the plan's tokens (module docstring), or
    None when no request of the plan asked for them.

    Built from device arrays it starts the device->host copies at once; `data` waits."""

    def __init__(self, rows: Any, max_logprobs: int, prompt_rows: Any = None) -> None:
        self._rows = rows
        self._prompt_rows = prompt_rows
        self.max_logprobs = max_logprobs
        for array in (rows, prompt_rows):
            start_copy = getattr(array, "copy_to_host_async", None)
            if start_copy is not None:
                start_copy()

    @functools.cached_property
    def data(self) -> np.ndarray:
        return np.asarray(self._rows)

    @functools.cached_property
    def prompt_data(self) -> np.ndarray:
        assert self._prompt_rows is not None, "the plan asked for no prompt logprobs"
        return np.asarray(self._prompt_rows)

    def prompt_token(self, t: int, position: int, top_n: int = 0) -> RowToken:
        """Token t of the plan's prompt-logprob rows: the prompt token at `position` (the
        plan token's position + 1), its logprob and rank, and top_n alternatives."""
        target, rank, logprob, top = self._unpack(self.prompt_data[t], top_n)
        return RowToken(token=target, position=position, logprob=logprob, top=top, rank=rank)

    def tokens(self, num_rows: int) -> list[int]:
        """The first `num_rows` rows' tokens (what `Scheduler.update_from_output` takes)."""
        return self.data[:num_rows, TOKEN].tolist()

    def row(self, r: int, top_n: int = 0) -> RowToken:
        token, position, logprob, top = self._unpack(self.data[r], top_n)
        return RowToken(token=token, position=position, logprob=logprob, top=top)

    def _unpack(self, row: np.ndarray, top_n: int) -> tuple[int, int, float, tuple]:
        n = self.max_logprobs
        floats = row.view(np.float32)
        top = tuple((int(row[TOP + i]), float(floats[TOP + n + i])) for i in range(min(top_n, n)))
        return int(row[TOKEN]), int(row[POSITION]), float(floats[LOGPROB]), top


class Engine(abc.ABC):
    """Runs scheduler plans over a paged KV cache. See the module docstring.

    `serve_cfg` is the config the engine was built for, resolved: `max_len`,
    `max_prompt_len` and `kv_cache_tokens` are set (the scheduler needs them). Usable from
    one thread at a time (the serving loop's).
    """

    serve_cfg: ServeConfig
    tokenizer: TokenizerLike
    cache_key: bytes  # what besides the tokens decides the K/V (prefix-cache hash root)

    @property
    def max_len(self) -> int:
        return self.serve_cfg.max_len

    @property
    def max_prompt_len(self) -> int:
        return self.serve_cfg.max_prompt_len

    @property
    def max_seqs(self) -> int:
        return self.serve_cfg.max_seqs

    @property
    def max_logprobs(self) -> int:
        return self.serve_cfg.max_logprobs

    @abc.abstractmethod
    def warmup(self) -> None:
        """Compiles every shape the engine will ever run. After it returns, no plan may
        trigger a compile."""

    @abc.abstractmethod
    def step(self, plan: SchedulerOutput) -> StepOutput:
        """Runs one plan (at least one row): writes its K/V into the pages it names and
        samples one token per row. The output may still be being computed (`StepOutput`
        waits when read). A token whose `plan.token_sources` entry is a row r is the token
        the previous step sampled for its row r (async scheduling: that step was not yet
        committed when this one was planned)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forgets the cache's contents (after a failed step, whose cache may be gone):
        the caller starts a fresh scheduler, so no page is assumed to hold anything."""

    def token_buckets(self) -> tuple[int, ...]:
        """The token counts a step is compiled for (ModelInfo reports them)."""
        return ()

    def info(self) -> dict[str, Any]:
        """What ModelInfo reports beyond the limits (config, manifest, backend ...)."""
        return {}
