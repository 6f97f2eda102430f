"""Tool calling in the OpenAI chat API. A named function and "required" are served as
structured output (vLLM's way, which needs no parser of the model's own format):

- `tool_choice: {"type": "function", "function": {"name": N}}`: the answer is N's
  arguments, a JSON object matching its `parameters` schema;
- `tool_choice: "required"`: the answer is a JSON array of one or more
  `{"name": ..., "parameters": ...}`, each matching one of the tools;
- `tool_choice: "none"`: a text answer (the template still shows the tools to the model).

Either way the grammar makes the JSON valid, and the server returns it as `tool_calls`.

"auto", OpenAI's default when tools are given, lets the model choose between text and
calls written in its family's own format, which the server then parses (vLLM's
`--tool-call-parser`, served with the same name):
- `hermes` (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks, any text before the first one being the message's content;
- `llama3_json` (Llama 3.1+): the answer is one or more `{"name": ..., "parameters": {...}}`
  objects, separated by `;`.
An answer whose calls do not parse is returned as text, as vLLM does. Without a parser
"auto" is refused with a 400, as vLLM refuses it without `--tool-call-parser`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from tandem.serve import openai_protocol as api
from tandem.serve.detok import holdback
from tandem.serve.structured import StructuredOutput

# the schema of a function that declares no parameters: an empty object, as OpenAI's
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolChoice = str | api.NamedToolChoice | None

_HERMES_OPEN = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


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


def parse_auto(parser: str, text: str) -> tuple[str | None, list[api.ToolCall]]:
    """(content, calls) of an "auto" answer in `parser`'s format (see the module
    docstring); no calls and the whole text as content when it makes none or they do
    not parse."""
    try:
        if parser == "hermes":
            start = text.find(_HERMES_OPEN)
            if start < 0:
                return text, []
            found = [json.loads(closed or open_) for closed, open_ in _HERMES_CALL.findall(text)]
            calls = [_call(c["name"], _arguments(c.get("arguments"))) for c in found]
            return text[:start] or None, calls
        body = text.lstrip()  # llama3_json: the answer opens with the call's object
        if not body.startswith("{"):
            return text, []
        calls, decoder, i = [], json.JSONDecoder(), 0
        while i < len(body):
            found, i = decoder.raw_decode(body, i)
            calls.append(_call(found["name"], _arguments(found.get("parameters"))))
            i = len(body) - len(body[i:].lstrip().removeprefix(";").lstrip())
        return None, calls
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []


def _arguments(value: Any) -> str:
    if not isinstance(value, dict | None):
        raise TypeError("arguments must be an object")
    return json.dumps(value or {}, ensure_ascii=False)


class ToolCallStream:
    """One streamed choice's deltas under a tool_choice that answers in calls: a named
    call's arguments stream as they decode (the first delta names the call); "required"
    calls are sent whole once the array is complete (`{}` deltas until then); under
    "auto" the text streams as content until the calls begin (in `parser`'s format), and
    the calls are sent whole at the end (`called`: then the finish reason is
    "tool_calls", as OpenAI's)."""

    def __init__(self, choice: ToolChoice, parser: str = "") -> None:
        self.choice = choice
        self.parser = parser
        self._text = ""  # "required": the answer so far; "auto": what is held back
        self._calling = False  # "auto": the calls have begun
        self._plain = False  # "auto", llama3_json: the answer began with text, no calls
        self._call: api.ToolCall | None = None  # the named call, once announced
        self.called = False

    def delta(self, text: str, final: bool) -> str:
        """The JSON of the chunk's `delta` for `text`, the answer's new characters."""
        if self.choice == "auto":
            return self._auto(text, final)
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

    def _auto(self, text: str, final: bool) -> str:
        self._text += text
        send = ""
        if not self._calling:
            start = self._call_start()
            if start is not None:  # (llama3_json: only whitespace before, not content)
                send = self._text[:start] if self.parser == "hermes" else ""
                self._text, self._calling = self._text[start:], True
            else:  # text, less what may still begin the calls
                cut = len(self._text) - (0 if final else self._undecided())
                send, self._text = self._text[:cut], self._text[cut:]
        if not (final and self._calling):
            return json.dumps({"content": send})
        content, calls = parse_auto(self.parser, self._text)
        if not calls:
            return json.dumps({"content": send + (content or "")})
        self.called = True
        return _deltas(calls, content=send or None)

    def _call_start(self) -> int | None:
        """Where the calls begin in the held text (None: not there, or never: llama3_json's
        answer that began with text)."""
        if self.parser == "hermes":
            start = self._text.find(_HERMES_OPEN)
            return None if start < 0 else start
        body = self._text.lstrip()
        if self._plain or not body.startswith("{"):
            self._plain = self._plain or bool(body)
            return None
        return len(self._text) - len(body)

    def _undecided(self) -> int:
        """How much of the held text's end may still begin the calls: a proper prefix of
        the Hermes tag; for llama3_json the answer's leading whitespace."""
        if self.parser == "hermes":
            return holdback(self._text, (_HERMES_OPEN,))
        return 0 if self._plain else len(self._text)


def _deltas(calls: list[api.ToolCall], content: str | None = None) -> str:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta["tool_calls"] = [{"index": i, **call.model_dump()} for i, call in enumerate(calls)]
    return json.dumps(delta)


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
