"""A chat choice's answer in the API's terms: the model's text split into its thinking
(`reasoning`, with a reasoning parser: tandem/serve/openai_reasoning.py), its content,
and its tool calls (under a tool_choice that answers in calls: openai_tools.py), whole
(`chat_message`) and streamed (`AnswerStream`). The calls are parsed from the content only,
after the thinking, as vLLM does."""

from __future__ import annotations

import dataclasses
from typing import Any

from tandem.serve import openai_protocol as api
from tandem.serve import openai_tools
from tandem.serve.openai_reasoning import ReasoningStream, split_reasoning


@dataclasses.dataclass(frozen=True)
class AnswerShape:
    """What a chat request's answers hold besides text, resolved once per request."""

    calls: openai_tools.ToolChoice = None  # a tool_choice that answers in calls; None: text
    tool_parser: str = ""  # the server's --tool-call-parser
    parallel: bool = True  # parallel_tool_calls
    thinks: bool = False  # the answer opens with thinking (openai_reasoning.thinks)
    include_reasoning: bool = True  # vLLM's: false leaves the thinking out of the response

    @property
    def plain(self) -> bool:
        """The answer is its text and nothing else."""
        return self.calls is None and not self.thinks


def chat_message(text: str, finish: str, shape: AnswerShape) -> tuple[api.AssistantMessage, str]:
    """A whole answer's message and finish reason: under a tool_choice that answers in
    calls the calls it makes ("tool_calls" when the model chose or had to make them); a
    named or "required" answer that is not whole JSON (cut short) stays text."""
    reasoning, content = split_reasoning(text) if shape.thinks else (None, text)
    if not shape.include_reasoning:
        reasoning = None
    thought = {"reasoning": reasoning, "reasoning_content": reasoning}
    if shape.calls is None or content is None:
        return api.AssistantMessage(content=content, **thought), finish
    content, calls = openai_tools.answer_calls(
        shape.calls, shape.tool_parser, content, shape.parallel
    )
    if not calls:
        return api.AssistantMessage(content=content, **thought), finish
    reason = openai_tools.finish_reason(shape.calls, finish)
    return api.AssistantMessage(content=content, tool_calls=calls, **thought), reason


class AnswerStream:
    """One streamed choice's `delta`s: the thinking as `reasoning` (and its earlier name
    `reasoning_content`) until it ends, then the content, read by the tool-call stream
    under a tool_choice that answers in calls."""

    def __init__(self, shape: AnswerShape) -> None:
        self.shape = shape
        self._thinking = ReasoningStream() if shape.thinks else None
        self._calls = None
        if shape.calls is not None:
            self._calls = openai_tools.ToolCallStream(
                shape.calls, shape.tool_parser, shape.parallel
            )

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """The chunk's delta for `text`, the answer's new characters."""
        reasoning = ""
        if self._thinking is not None:
            reasoning, text = self._thinking.push(text, final)
        if self._calls is None:
            delta = {"content": text}
        elif self._thinking is not None and self._thinking.thinking:
            delta = {"content": ""}  # the calls are in the content, which has not begun
        else:
            delta = self._calls.delta(text, final)
        if reasoning and self.shape.include_reasoning:
            if delta == {"content": ""}:
                delta = {}
            delta = {"reasoning": reasoning, "reasoning_content": reasoning, **delta}
        return delta

    def finish_reason(self, finish: str | None) -> str | None:
        """The chunk's finish reason: "tool_calls" once the model made calls it chose or
        had to make (openai_tools.finish_reason)."""
        if self._calls is not None and self._calls.called:
            return openai_tools.finish_reason(self.shape.calls, finish)
        return finish
