"""Structured output: a grammar per request, enforced as a token bitmask in the batched step.

A request may carry a `StructuredOutput` (a JSON schema, "any JSON object", a regex or a
Lark grammar). The grammar engine is llguidance (the Rust library vLLM and SGLang use):
`GrammarCompiler` builds its tokenizer once from the served HF `tokenizer.json` (byte-level
BPE included) with the model's stop ids as its EOS, and compiles each request's grammar
before submission (off the event loop), so a bad schema / regex / grammar is a `ValueError`
naming the field there, never an error in the serving loop.

Host side, one `GrammarMatcher` per request (on `scheduler.Request.grammar`) advances with
each token the scheduler commits. A preempted request keeps its generated tokens and is
recomputed from them, so its matcher is already in the right state when it samples again;
nothing is rolled back. Before each step `fill_bitmask` writes, for every row that samples
and has a grammar, the allowed tokens as a bitmask `[Rb, ceil(V / 32)]` int32 (bit `t % 32`
of word `t // 32` set = token t allowed; V the model's vocabulary, padding included: ids
past the tokenizer are never allowed there); other rows get "all allowed". Once the grammar
is complete it allows only EOS / stop ids. On the device `apply_bitmask` sets disallowed
logits to -inf before greedy or sampled choice (the engine skips it when no row has a
grammar).

JSON whitespace: llguidance's default lets any run of whitespace sit between JSON tokens,
so a model that likes newlines can loop on them until max_tokens and return invalid JSON
(vLLM's default). Here JSON grammars are compact: `whitespace_flexible=False`, separators
"," and ":", no whitespace between tokens at all (a schema's own `x-guidance` options may
ask for more).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import TYPE_CHECKING, Literal, get_args

import jax
import jax.numpy as jnp
import llguidance
import llguidance.numpy
import numpy as np

from tandem.serve.engine_api import TokenizerLike

if TYPE_CHECKING:
    from tandem.serve.scheduler import SchedulerOutput

GrammarKind = Literal["json_schema", "json_object", "regex", "grammar"]
# llguidance's JSON options for every JSON grammar (module docstring: compact output).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (n choices and repeated schemas reuse them)


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. `spec`: the JSON schema's text (json_schema),
    the regex (regex) or the Lark grammar in llguidance's syntax (grammar); empty for
    json_object (any JSON object)."""

    kind: GrammarKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in get_args(GrammarKind):
            raise ValueError(
                f"structured_output={self.kind!r} is invalid: allowed {get_args(GrammarKind)}"
            )
        if not isinstance(self.spec, str) or (self.kind != "json_object" and not self.spec):
            raise ValueError(f"{self.kind}={self.spec!r} is invalid: must be a non-empty string")

    def grammar(self) -> str:
        """The llguidance grammar (ValueError naming the field if the spec is malformed)."""
        try:
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, defaults=JSON_OPTIONS
                )
            if self.kind == "json_schema":
                schema = json.loads(self.spec)
                if not isinstance(schema, dict):
                    raise ValueError("a JSON schema is a JSON object")
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.spec)
            return llguidance.LLMatcher.grammar_from_lark(self.spec)
        except ValueError as err:  # json.JSONDecodeError is one
            raise ValueError(f"{self.kind}={self.spec[:80]!r} is invalid: {err}") from None


class GrammarCompiler:
    """The served tokenizer as llguidance sees it, and the grammars compiled against it.

    Thread-safe. Compiling a grammar (building its matcher, the costly part for a large
    schema over a large vocabulary) runs on whichever thread asks first: the APIs ask from a
    worker (`Orchestrator.check_grammar`), so the event loop only finds it compiled. The
    lock guards the cache alone and is never held while compiling, so a compile on a worker
    never blocks the loop's lookups. Each request then gets a `deep_copy` of the compiled
    matcher (cheap: the lexer and tokenizer are shared)."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        hf = getattr(tokenizer, "hf", None)
        if hf is None:
            raise ValueError(
                "structured_output is invalid: the served tokenizer is not a HF tokenizer"
            )
        # eos_token: what a finished grammar allows; the model's stop ids, so that any of
        # them ends the request as it would without a grammar.
        self.tokenizer = llguidance.LLTokenizer(hf.to_str(), eos_token=sorted(tokenizer.stop_ids))
        self.eos_ids = frozenset(self.tokenizer.eos_tokens)
        self.mask_words = (self.tokenizer.vocab_size + 31) // 32
        self.executor = llguidance.LLExecutor()
        self._lock = threading.Lock()
        # compiled grammars, least recently used first: matchers in their start state
        self._compiled: collections.OrderedDict[StructuredOutput, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )

    def compile(self, output: StructuredOutput) -> llguidance.LLMatcher:
        """`output`'s matcher in its start state, compiled once and kept (LRU); raises
        ValueError naming the field if the grammar does not compile. Callers copy it."""
        with self._lock:
            compiled = self._compiled.get(output)
            if compiled is not None:
                self._compiled.move_to_end(output)
                return compiled
        # Two threads may compile the same grammar at once; both results are equal.
        compiled = llguidance.LLMatcher(self.tokenizer, output.grammar(), log_level=0)
        if compiled.is_error():
            raise ValueError(
                f"{output.kind}={output.spec[:80]!r} is invalid: {compiled.get_error()}"
            )
        with self._lock:
            self._compiled[output] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, output: StructuredOutput, after: int | None = None) -> GrammarMatcher:
        """A request's matcher; with `after`, the grammar holds once that token has been
        generated (a reasoning model's end of thinking: `GrammarMatcher.waits_for`)."""
        return GrammarMatcher(self.compile(output).deep_copy(), self, after)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(
        self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler, after: int | None = None
    ) -> None:
        self._matcher = matcher
        self.compiler = compiler
        # Until this token is generated every token is allowed and none advances the
        # grammar: a reasoning model thinks freely and the grammar holds for its answer
        # (vLLM's structured output with a reasoning parser). None: it holds from the start.
        self.waits_for = after
        # The grammar is complete and one of its EOS (the model's stop ids) was accepted.
        # (llguidance's is_stopped() turns true already at the last byte the grammar
        # allows, before that EOS: the request then still has its EOS to generate.)
        self.finished = False

    def accept(self, token: int) -> bool:
        """Advances past a generated token; False if the grammar does not allow it (the
        mask makes that impossible unless something upstream is broken)."""
        if self.waits_for is not None:
            if token == self.waits_for:
                self.waits_for = None
            return True
        ok = self._matcher.consume_token(token)
        self.finished = ok and token in self.compiler.eos_ids
        return ok

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def fill_bitmask(plan: SchedulerOutput, rows: int, vocab_size: int) -> np.ndarray | None:
    """The step's token bitmask [rows, ceil(vocab_size / 32)] int32 (module docstring), or
    None when no row that samples has a grammar (the common step: nothing to build)."""
    constrained = [
        (r, req.grammar)
        for r, req in enumerate(plan.requests)
        if req.grammar is not None and req.grammar.waits_for is None and plan.sample[r]
    ]
    if not constrained:
        return None
    compiler = constrained[0][1].compiler
    words = compiler.mask_words
    bitmask = np.full((rows, (vocab_size + 31) // 32), -1, np.int32)  # [Rb, W]
    scratch = np.empty((len(constrained), words), np.int32)  # [G, Wt] the tokenizer's ids
    llguidance.numpy.fill_next_token_bitmask_par(
        compiler.executor, [(g._matcher, i) for i, (_, g) in enumerate(constrained)], scratch
    )
    index = [r for r, _ in constrained]
    bitmask[index] = 0  # ids past the tokenizer (the model's padding) are never allowed
    bitmask[index, :words] = scratch
    return bitmask


def allows(bitmask: np.ndarray, token: int) -> bool:
    """Whether a bitmask row [W] allows `token` (host side, for engines without a device)."""
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)


def apply_bitmask(
    logits: jax.Array,  # [R, V] float32
    bitmask: jax.Array,  # [R, W] int32, W = ceil(V / 32)
) -> jax.Array:  # [R, V]
    """Disallowed tokens' logits to -inf (bit t % 32 of word t // 32 clear)."""
    rows, vocab = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]
    allowed = bits.reshape(rows, -1)[:, :vocab].astype(bool)  # [R, V]
    return jnp.where(allowed, logits, -jnp.inf)
