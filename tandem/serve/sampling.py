"""Per-request sampling parameters and the on-device sampler every slot shares.

`SamplingParams` is validated on the host (errors name the offending field, which the gRPC
layer turns into INVALID_ARGUMENT). The device side sees only per-slot vectors
(temperature, top_k, top_p, min_p, seed) so one compiled `sample` serves every mix of
requests; penalties, logit_bias and min_tokens adjust the logits before it
(tandem/serve/logits_processors.py).

Determinism: the random key for a token is derived from (request seed, the token's absolute
position) and nothing else, so a seeded request gives the same tokens whatever else is in
the batch and whichever slot it lands in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tandem.serve.structured import StructuredOutput

_NEG_INF = -1e30
# Most logit_bias entries a request may send (OpenAI's documented limit): the engine passes
# every row's entries as a fixed-width [rows, MAX_LOGIT_BIAS] array, so this is compiled in.
MAX_LOGIT_BIAS = 300
# With min_tokens, the most ids of a request's own stop_token_ids (the model's EOS ids come
# on top): they are suppressed on the device through a fixed-width per-row list too.
MAX_MIN_TOKENS_STOP_IDS = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 disable those filters; seed
    None means the orchestrator draws one (the output is then not reproducible).
    Penalties (vLLM's and OpenAI's semantics, 0 / 0 / 1 = off): presence_penalty and
    frequency_penalty subtract from the logit of every token the request has generated (once,
    and once per occurrence); repetition_penalty divides a positive logit (multiplies a
    negative one) of every token in the prompt or the output. logit_bias ((token id, bias)
    pairs) adds to the raw logits; min_tokens holds the stop ids (EOS unless ignore_eos,
    and stop_token_ids) off until that many tokens were generated. All of them change greedy
    output too; reported logprobs stay the model's raw distribution.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False
    structured_output: StructuredOutput | None = None  # the grammar the output must match
    # ... from the token after this one on (a reasoning model's end of thinking); None:
    # from the first token
    grammar_after_token: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's and the top n
    skip_special_tokens: bool = True  # False: special tokens show in the text (vLLM's)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1",
        )
        _check(
            _is_real(self.temperature) and self.temperature >= 0.0,
            "temperature",
            self.temperature,
            "a finite number >= 0 (0 = greedy)",
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k",
            self.top_k,
            "an integer >= 0 (0 = disabled)",
        )
        _check(
            _is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "a number in (0, 1]",
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
            "seed",
            self.seed,
            "None or a 64-bit integer",
        )
        _check(
            isinstance(self.logprobs, int) and self.logprobs >= 0,
            "logprobs",
            self.logprobs,
            "an integer >= 0",
        )
        _check(
            self.prompt_logprobs is None
            or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
            "prompt_logprobs",
            self.prompt_logprobs,
            "None or an integer >= 0",
        )
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", s, "non-empty strings")
        for t in self.stop_token_ids:
            _check(isinstance(t, int) and t >= 0, "stop_token_ids", t, "integers >= 0")
        _check(
            self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
            "structured_output",
            self.structured_output,
            "None or a StructuredOutput",
        )
        _check(
            self.grammar_after_token is None
            or (
                self.structured_output is not None
                and isinstance(self.grammar_after_token, int)
                and self.grammar_after_token >= 0
            ),
            "grammar_after_token",
            self.grammar_after_token,
            "None, or a token id >= 0 with a structured_output",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2.0 <= value <= 2.0, name, value, "a number in [-2, 2]")
        _check(
            _is_real(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty",
            self.repetition_penalty,
            "a finite number > 0 (1 = off)",
        )
        _check(
            _is_real(self.min_p) and 0.0 <= self.min_p <= 1.0,
            "min_p",
            self.min_p,
            "a number in [0, 1] (0 = off)",
        )
        _check(
            len(self.logit_bias) <= MAX_LOGIT_BIAS,
            "logit_bias",
            f"<{len(self.logit_bias)} entries>",
            f"at most {MAX_LOGIT_BIAS} entries",
        )
        seen: set[int] = set()
        for entry in self.logit_bias:
            ok = isinstance(entry, tuple) and len(entry) == 2
            _check(ok, "logit_bias", entry, "(token id, bias) pairs")
            token, bias = entry
            ok = isinstance(token, int) and not isinstance(token, bool) and token >= 0
            _check(ok and token not in seen, "logit_bias", token, "distinct token ids >= 0")
            seen.add(token)
            ok = _is_real(bias) and -100.0 <= bias <= 100.0
            _check(ok, "logit_bias", bias, f"biases in [-100, 100] (token {token})")
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"an integer in [0, max_tokens={self.max_tokens}]",
        )
        _check(
            self.min_tokens == 0 or len(set(self.stop_token_ids)) <= MAX_MIN_TOKENS_STOP_IDS,
            "stop_token_ids",
            f"<{len(set(self.stop_token_ids))} ids>",
            f"at most {MAX_MIN_TOKENS_STOP_IDS} ids when min_tokens is set",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_limits(self, *, vocab_size: int, max_logprobs: int) -> None:
        """Checks the fields whose bounds depend on the served model."""
        _check(self.top_k <= vocab_size, "top_k", self.top_k, f"<= vocab_size ({vocab_size})")
        _check(
            (self.grammar_after_token or 0) < vocab_size,
            "grammar_after_token",
            self.grammar_after_token,
            f"a token id < vocab_size ({vocab_size})",
        )
        _check(
            self.logprobs <= max_logprobs,
            "logprobs",
            self.logprobs,
            f"<= {max_logprobs} (the server's max_logprobs)",
        )
        _check(
            (self.prompt_logprobs or 0) <= max_logprobs,
            "prompt_logprobs",
            self.prompt_logprobs,
            f"<= {max_logprobs} (the server's max_logprobs)",
        )
        for t in self.stop_token_ids:
            _check(t < vocab_size, "stop_token_ids", t, f"ids < vocab_size ({vocab_size})")
        for t, _ in self.logit_bias:
            _check(t < vocab_size, "logit_bias", t, f"token ids < vocab_size ({vocab_size})")

    @property
    def penalized(self) -> bool:
        """Whether a penalty is on (the step then counts the sequence's tokens)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: must be {allowed}")


def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed (signed or unsigned) as two uint32 words (hi, lo) for the device."""
    u = seed & 0xFFFFFFFFFFFFFFFF
    return (u >> 32) & 0xFFFFFFFF, u & 0xFFFFFFFF


def token_key(seed_words: jax.Array, position: jax.Array) -> jax.Array:
    """PRNG key of the token at `position` of a request whose seed is `seed_words` (hi, lo).

    seed_words: [2] uint32; position: [] int32. A pure function of its inputs: this is what
    makes seeded sampling independent of batch composition and slot index.
    """
    key = jax.random.key(0)
    key = jax.random.fold_in(key, seed_words[0])
    key = jax.random.fold_in(key, seed_words[1])
    return jax.random.fold_in(key, position)


def first_argmax(x: jax.Array) -> jax.Array:  # [B, V] -> [B] int32
    """`jnp.argmax(x, axis=-1)` (the first maximum on ties) as a max then a min over
    indices: XLA's CPU argmax is a (value, index) reduction several times slower than these
    two plain reductions (docs/benchmarks.md). A row with NaN (no element equals its max) gives
    V - 1, a token id that exists, where argmax would point at the NaN."""
    vocab = x.shape[-1]
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(vocab, dtype=jnp.int32)
    return jnp.min(jnp.where(x == best, index, vocab - 1), axis=-1)


def sample(
    logits: jax.Array,  # [B, V] float32
    temperature: jax.Array,  # [B] float32, 0 = greedy
    top_k: jax.Array,  # [B] int32, 0 = disabled
    top_p: jax.Array,  # [B] float32, 1 = disabled
    min_p: jax.Array,  # [B] float32, 0 = disabled
    seed_words: jax.Array,  # [B, 2] uint32
    positions: jax.Array,  # [B] int32, absolute position of the token being sampled
) -> jax.Array:  # [B] int32
    """Samples one token per slot with that slot's own parameters (jit-friendly, fixed shapes).

    Filters apply in vLLM's order: temperature, then min-p, then top-k, then top-p over what
    those kept. min_p keeps the tokens whose probability is >= min_p x the top one's, i.e.
    whose scaled logit is >= the top logit + log(min_p): no softmax needed for it, and a
    prefix of the sorted order like top-k's (min_p has no effect on greedy rows).
    """
    logits = logits.astype(jnp.float32)
    greedy_tokens = first_argmax(logits)  # [B]

    def sampled() -> jax.Array:  # [B] int32
        vocab = logits.shape[-1]
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = logits / safe_t[:, None]  # [B, V]
        order = jnp.argsort(-scaled, axis=-1)  # [B, V] token ids, most likely first
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
        ranks = jnp.arange(vocab)[None, :]  # [1, V]
        k = jnp.where(top_k > 0, top_k, vocab)  # [B]
        keep = ranks < k[:, None]  # [B, V]
        floor = sorted_logits[:, :1] + jnp.log(min_p)[:, None]  # [B, 1]; log 0 = -inf
        keep = keep & (sorted_logits >= floor)  # the top token always survives
        probs = jax.nn.softmax(jnp.where(keep, sorted_logits, _NEG_INF), axis=-1)  # [B, V]
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of better tokens
        keep = keep & (mass_before < top_p[:, None])  # the top token always survives
        masked = jnp.where(keep, sorted_logits, _NEG_INF)  # [B, V]
        keys = jax.vmap(token_key)(seed_words, positions)  # [B] keys
        choice = jax.vmap(jax.random.categorical)(keys, masked)  # [B] rank picked
        tokens = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, tokens, greedy_tokens)

    # An all-greedy batch (the common serving case) skips the full-vocabulary sort.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy_tokens)


def logprobs_of(
    logits: jax.Array,  # [B, V] float32
    tokens: jax.Array,  # [B] int32
    top_n: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the model's raw distribution (before temperature/filters).

    Returns (chosen [B] f32, top ids [B, top_n] int32, top logprobs [B, top_n] f32).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]  # [B]
    if top_n == 0:
        empty_i = jnp.zeros((logits.shape[0], 0), jnp.int32)
        return chosen, empty_i, jnp.zeros((logits.shape[0], 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logp, top_n)  # [B, top_n]
    return chosen, top_ids.astype(jnp.int32), top_lp


def prompt_logprobs_of(
    head: Callable[[jax.Array], jax.Array],  # [1, t, D] hidden -> [1, t, V] float32 logits
    hidden: jax.Array,  # [T, D] every token's last hidden state
    targets: jax.Array,  # [T] int32: the prompt token after each token, -1: not asked
    top_n: int,
    block: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prompt logprobs: for each token the log-probability of the prompt token after it
    (`targets`), that token's rank in the vocabulary (1 = the most likely) and the top_n
    alternatives, under the model's raw distribution.

    The LM head and log-softmax run over blocks of `block` tokens one after another
    (`lax.map`), so at most [block, V] float32 logits exist at a time, and a block with no
    target is skipped (`lax.cond`): a step where no request asked pays an empty branch
    per block. Returns (logprob [T], rank [T], top ids [T, top_n], top logprobs [T, top_n]);
    a token without a target gets zeros.
    """
    t, d = hidden.shape
    blocks = -(-t // block)
    pad = blocks * block - t
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(blocks, block, d)  # [Nb, b, D]
    targets = jnp.pad(targets, (0, pad), constant_values=-1).reshape(blocks, block)  # [Nb, b]

    def one_block(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        x, target = args  # [b, D], [b]

        def compute() -> tuple[jax.Array, ...]:
            logits = head(x[None])[0]  # [b, V] float32
            chosen, top_ids, top_lps = logprobs_of(logits, jnp.maximum(target, 0), top_n)
            target_logit = jnp.take_along_axis(logits, jnp.maximum(target, 0)[:, None], axis=-1)
            rank = 1 + jnp.sum(logits > target_logit, axis=-1, dtype=jnp.int32)  # [b]
            return chosen, rank, top_ids, top_lps

        def skip() -> tuple[jax.Array, ...]:
            return (
                jnp.zeros((block,), jnp.float32),
                jnp.zeros((block,), jnp.int32),
                jnp.zeros((block, top_n), jnp.int32),
                jnp.zeros((block, top_n), jnp.float32),
            )

        return jax.lax.cond(jnp.any(target >= 0), compute, skip)

    if blocks == 1:  # a small step: one branch, no loop around it
        chosen, rank, top_ids, top_lps = (a[None] for a in one_block((hidden[0], targets[0])))
    else:
        chosen, rank, top_ids, top_lps = jax.lax.map(one_block, (hidden, targets))
    return (
        chosen.reshape(-1)[:t],  # [T]
        rank.reshape(-1)[:t],  # [T]
        top_ids.reshape(-1, top_n)[:t],  # [T, top_n]
        top_lps.reshape(-1, top_n)[:t],  # [T, top_n]
    )
