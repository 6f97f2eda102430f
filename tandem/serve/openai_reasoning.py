"""A reasoning model's thinking apart from its answer (vLLM's `--reasoning-parser`).

Qwen3 and DeepSeek-R1 (and their distillations) think before they answer:
`<think>reasoning</think>content`, where `<think>` may already sit in the prompt (the
chat template opens it) and so be missing from the output. The chat API returns the two
apart: the thinking as `reasoning` (vLLM's field today) and `reasoning_content` (its
earlier name, which DeepSeek's API, chat UIs and agent SDKs read), the answer as
`content`, which the tool-call parser then reads.

- `deepseek_r1`: the answer thinks until `</think>`; an answer cut short before it is all
  reasoning;
- `qwen3`: the same, unless the request turned thinking off (`chat_template_kwargs:
  {"enable_thinking": false}`: the template closes an empty think block in the prompt),
  when the whole answer is content.

An answer constrained by a grammar (`response_format`, `structured_outputs`, a named or
"required" tool choice) thinks freely too: its grammar holds from the token after
`</think>` (structured.GrammarMatcher.waits_for), so the content matches it, as vLLM's
structured output does with a reasoning parser. One `ReasoningStream` splits both a
streamed answer and a whole one, so the two agree.
"""

from __future__ import annotations

from tandem.serve.detok import holdback

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def thinks(parser: str, chat_template_kwargs: dict | None, continued: str | None = None) -> bool:
    """Whether an answer under `parser` ("": none) begins with thinking. `continued`: the
    text of the message the answer continues (continue_final_message), which thinks on
    only if it ends inside a `<think>` block."""
    if continued is not None:
        return bool(parser) and THINK_OPEN in continued.rpartition(THINK_CLOSE)[2]
    if parser == "qwen3":
        return (chat_template_kwargs or {}).get("enable_thinking", True) is not False
    return parser == "deepseek_r1"


class ReasoningStream:
    """An answer's text in, (reasoning, content) deltas out: everything up to the first
    `</think>` is reasoning (an opening `<think>` dropped), the rest content. A possible
    start of either tag at the end of the text is held back until the next text shows
    whether it is one."""

    def __init__(self) -> None:
        self.thinking = True  # no `</think>` yet: the content has not begun
        self._opened = False  # the `<think>` tag was seen (and dropped)
        self._held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        if not self.thinking:
            return "", text
        held = self._held + text
        if not self._opened and THINK_OPEN in held.partition(THINK_CLOSE)[0]:
            held = held.replace(THINK_OPEN, "", 1)
            self._opened = True
        reasoning, closed, content = held.partition(THINK_CLOSE)
        if closed:
            self.thinking, self._held = False, ""
            return reasoning, content
        tags = (THINK_CLOSE,) if self._opened else (THINK_OPEN, THINK_CLOSE)
        keep = 0 if final else holdback(held, tags)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], ""


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer, None for an empty part."""
    reasoning, content = ReasoningStream().push(text, final=True)
    return reasoning or None, content or None
