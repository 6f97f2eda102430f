"""Tool calling in the OpenAI chat API, served as structured output (vLLM's way for a
named function and "required", which needs no parser of the model's own format).

- `tool_choice: {"type": "function", "function": {"name": N}}`: the answer is N's
  arguments, a JSON object matching its `parameters` schema;
- `tool_choice: "required"`: the answer is a JSON array of one or more
  `{"name": ..., "parameters": ...}`, each matching one of the tools;
- `tool_choice: "none"`: a text answer (the template still shows the tools to the model).

Either way the grammar makes the JSON valid, and the server returns it as `tool_calls`.
"auto", OpenAI's default when tools are given, lets the model choose between text and
calls in its own format (Hermes `<tool_call>` tags for Qwen, Llama 3's JSON, Mistral's
`[TOOL_CALLS]`): that needs a parser per format, which tandem does not have yet, so it
is refused with a 400, as vLLM refuses it without `--tool-call-parser`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from tandem.serve import openai_protocol as api
from tandem.serve.structured import StructuredOutput

# the schema of a function that declares no parameters: an empty object, as OpenAI's
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolChoice = str | api.NamedToolChoice | None


def resolve_choice(tools: Sequence[api.Tool] | None, choice: ToolChoice) -> ToolChoice:
    """The request's tool_choice with OpenAI's default filled in: "auto" when tools are
    given, "none" otherwise. Raises ValueError naming `tool_choice` for a choice the
    tools cannot meet."""
    if choice is None:
        return "auto" if tools else "none"
    if choice == "none" or choice == "auto":
        return choice
    if not tools:
        raise ValueError(f"tool_choice={_shown(choice)} is invalid: it needs `tools`")
    if isinstance(choice, api.NamedToolChoice):
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise ValueError(
                f"tool_choice={_shown(choice)} is invalid: no tool is named "
                f"{choice.function.name!r} (tools: {names})"
            )
    return choice


def tool_grammar(tools: Sequence[api.Tool], choice: ToolChoice) -> StructuredOutput | None:
    """What the answer must match for a resolved tool_choice (None: free text)."""
    if choice == "required":
        calls = [_call_schema(t.function) for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    elif isinstance(choice, api.NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        schema = tool.function.parameters or _NO_PARAMETERS
    else:
        return None
    return StructuredOutput("json_schema", json.dumps(schema))


def _call_schema(function: api.FunctionDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [function.name]},
            "parameters": function.parameters or _NO_PARAMETERS,
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def tool_calls(choice: ToolChoice, text: str) -> list[api.ToolCall] | None:
    """The calls an answer under a named or "required" tool_choice makes; None when the
    text is not whole JSON ("required" cut short by max_tokens: then it stays text). A
    named call cut short keeps its partial arguments, as OpenAI's do."""
    if isinstance(choice, api.NamedToolChoice):
        return [_call(choice.function.name, text)]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


def _call(name: str, arguments: str) -> api.ToolCall:
    return api.ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=api.FunctionCall(name=name, arguments=arguments),
    )


class ToolCallStream:
    """One streamed choice's deltas under a named or "required" tool_choice: a named
    call's arguments stream as they decode (the first delta names the call); "required"
    calls are sent whole once the array is complete (`{}` deltas until then)."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._text = ""
        self._call: api.ToolCall | None = None  # the named call, once announced

    def delta(self, text: str, final: bool) -> str:
        """The JSON of the chunk's `delta` for `text`, the answer's new characters."""
        if isinstance(self.choice, api.NamedToolChoice):
            if self._call is None:
                self._call = _call(self.choice.function.name, text)
                return _deltas([self._call])
            return json.dumps({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        self._text += text
        if not final:
            return "{}"
        calls = tool_calls(self.choice, self._text)
        return json.dumps({"content": self._text}) if calls is None else _deltas(calls)


def _deltas(calls: list[api.ToolCall]) -> str:
    return json.dumps(
        {"tool_calls": [{"index": i, **call.model_dump()} for i, call in enumerate(calls)]}
    )


def template_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's history `tool_calls` as chat templates read them: the
    arguments as an object, not OpenAI's JSON text (transformers' convention for
    tool-use templates; vLLM converts them the same way)."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            arguments = function["arguments"]
            try:
                parsed = json.loads(arguments) if arguments else {}
            except json.JSONDecodeError:
                raise ValueError(
                    f"tool_calls arguments={arguments!r:.80} is invalid: not JSON"
                ) from None
            call = {**call, "function": {**function, "arguments": parsed}}
        calls.append(call)
    return {**message, "tool_calls": calls} if calls else message


def _shown(choice: ToolChoice) -> str:
    return repr(choice.model_dump() if isinstance(choice, api.NamedToolChoice) else choice)
