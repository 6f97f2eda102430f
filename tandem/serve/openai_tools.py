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
  objects, separated by `;`;
- `mistral` (Mistral 7B v0.3 and later): `[TOOL_CALLS]` (a special token, so the text of
  such requests keeps special tokens, as vLLM's) then a JSON array of `{"name": ...,
  "arguments": {...}}` (tokenizers before v11) or `name[ARGS]{...}` per call, each after
  its own `[TOOL_CALLS]` (v11 and later); text before it is the content. Its call ids are
  nine letters and digits, the only ids Mistral's templates take back as history.
An answer whose calls do not parse is returned as text, as vLLM does. Without a parser
"auto" is refused with a 400, as vLLM refuses it without `--tool-call-parser`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tandem.serve import openai_protocol as api
from tandem.serve.detok import holdback
from tandem.serve.structured import StructuredOutput

# the schema of a function that declares no parameters: an empty object, as OpenAI's
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolChoice = str | api.NamedToolChoice | None

_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_MISTRAL_OPEN = "[TOOL_CALLS]"

# (name, arguments) of each call; raises ValueError, KeyError, TypeError or
# AttributeError on text that is not calls
_Calls = list[tuple[str, Any]]


def _hermes_calls(text: str) -> _Calls:
    found = [json.loads(closed or open_) for closed, open_ in _HERMES_CALL.findall(text)]
    return [(c["name"], c.get("arguments")) for c in found]


def _llama3_calls(text: str) -> _Calls:
    calls, decoder, i = [], json.JSONDecoder(), 0
    while i < len(text):
        found, i = decoder.raw_decode(text, i)
        calls.append((found["name"], found.get("parameters", found.get("arguments"))))
        i = len(text) - len(text[i:].lstrip().removeprefix(";").lstrip())
    return calls


def _mistral_calls(text: str) -> _Calls:
    body = text.removeprefix(_MISTRAL_OPEN).lstrip()
    if body.startswith("["):  # tokenizers before v11: one JSON array (what follows it ignored)
        found, _ = json.JSONDecoder().raw_decode(body)
        return [(c["name"], c.get("arguments")) for c in found]
    calls = []
    for raw in text.split(_MISTRAL_OPEN)[1:]:  # v11 and later: name[ARGS]{...} per call
        brace = raw.index("{")
        arguments, _ = json.JSONDecoder().raw_decode(raw, brace)
        calls.append((raw[:brace].replace("[ARGS]", "").strip(), arguments))
    return calls


def _openai_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _mistral_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


@dataclasses.dataclass(frozen=True)
class CallFormat:
    """How a model family writes tool calls in its answer (a `--tool-call-parser`)."""

    # the text that opens the calls, anywhere after the content; None: the answer is the
    # calls or text, as its first character says (`{`: calls)
    opener: str | None
    calls: Callable[[str], _Calls]  # the calls' text, from the opener on
    new_id: Callable[[], str] = _openai_id
    keeps_special_tokens: bool = False  # the opener is a special token


FORMATS: dict[str, CallFormat] = {
    "hermes": CallFormat("<tool_call>", _hermes_calls),
    "llama3_json": CallFormat(None, _llama3_calls),
    "mistral": CallFormat(_MISTRAL_OPEN, _mistral_calls, _mistral_id, keeps_special_tokens=True),
}


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


def tool_grammar(
    tools: Sequence[api.Tool], choice: ToolChoice, parallel: bool = True
) -> StructuredOutput | None:
    """What the answer must match for a resolved tool_choice (None: free text); with
    `parallel` off (`parallel_tool_calls: false`) "required" makes exactly one call. Each
    tool's `$defs` move to the root, where its `$ref`s ("#/$defs/...") point once its
    schema is nested in the array's (vLLM does the same); a name two tools define
    differently is a ValueError naming `tools`."""
    if choice == "required":
        defs: dict[str, Any] = {}
        calls = [_call_schema(t.function, defs) for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
    elif isinstance(choice, api.NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        schema = tool.function.parameters or _NO_PARAMETERS
    else:
        return None
    return StructuredOutput("json_schema", json.dumps(schema))


def _call_schema(function: api.FunctionDefinition, defs: dict[str, Any]) -> dict[str, Any]:
    parameters = dict(function.parameters or _NO_PARAMETERS)
    for name, definition in parameters.pop("$defs", {}).items():
        if defs.setdefault(name, definition) != definition:
            raise ValueError(
                f"tools={function.name!r}: $defs {name!r} is invalid: another tool defines "
                "it differently (one schema holds every tool's $defs)"
            )
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [function.name]},
            "parameters": parameters,
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def answer_calls(
    choice: ToolChoice, parser: str, text: str, parallel: bool = True
) -> tuple[str | None, list[api.ToolCall]]:
    """(content, calls) of an answer under a tool_choice that answers in calls. A named
    call cut short by max_tokens keeps its partial arguments, as OpenAI's do; "required"
    cut short is not whole JSON and stays text; "auto" as `parse_auto`, keeping the first
    call only without `parallel` (vLLM's)."""
    if isinstance(choice, api.NamedToolChoice):
        return None, [_call(parser, choice.function.name, text)]
    if choice == "auto":
        content, calls = parse_auto(parser, text)
        return content, calls if parallel else calls[:1]
    try:
        found = json.loads(text)
        return None, [_call(parser, c["name"], _arguments(c["parameters"])) for c in found]
    except (ValueError, KeyError, TypeError):
        return text, []


def finish_reason(choice: ToolChoice, finish: str | None) -> str | None:
    """OpenAI's finish reason of an answer that made calls: "tool_calls" when the model
    chose or was required to call ("auto", "required"), "stop" for a named function."""
    if finish == "stop" and not isinstance(choice, api.NamedToolChoice):
        return "tool_calls"
    return finish


def _call(parser: str, name: str, arguments: str) -> api.ToolCall:
    """A call with an id of the served family's kind (OpenAI's without a parser)."""
    new_id = FORMATS[parser].new_id if parser else _openai_id
    return api.ToolCall(id=new_id(), function=api.FunctionCall(name=name, arguments=arguments))


def parse_auto(parser: str, text: str) -> tuple[str | None, list[api.ToolCall]]:
    """(content, calls) of an "auto" answer in `parser`'s format (see the module
    docstring); no calls and the whole text as content when it makes none or they do
    not parse."""
    form = FORMATS[parser]
    if form.opener is None:
        start = len(text) - len(text.lstrip())
        if not text.startswith("{", start):
            return text, []
    else:
        start = text.find(form.opener)
        if start < 0:
            return text, []
    try:
        calls = [_call(parser, name, _arguments(args)) for name, args in form.calls(text[start:])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return text[:start] if form.opener and start else None, calls


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

    def __init__(self, choice: ToolChoice, parser: str = "", parallel: bool = True) -> None:
        self.choice = choice
        self.parser = parser
        self.parallel = parallel
        self._text = ""  # "required": the answer so far; "auto": what is held back
        self._calling = False  # "auto": the calls have begun
        self._plain = False  # "auto" without an opener: the answer began as text, no calls
        # "auto": the text that opens the calls (None: the answer opens with them)
        self._opener = FORMATS[parser].opener if choice == "auto" else None
        self._call: api.ToolCall | None = None  # the named call, once announced
        self.called = False

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """The chunk's `delta` for `text`, the answer's new characters."""
        if self.choice == "auto":
            return self._auto(text, final)
        if isinstance(self.choice, api.NamedToolChoice):
            if self._call is None:
                self._call = _call(self.parser, self.choice.function.name, text)
                return _deltas([self._call])
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        self._text += text
        if not final:
            return {}
        content, calls = answer_calls(self.choice, self.parser, self._text)
        self.called = bool(calls)
        return _deltas(calls) if calls else {"content": content}

    def _auto(self, text: str, final: bool) -> dict[str, Any]:
        self._text += text
        send, opener = "", self._opener
        if not self._calling:
            if opener is None and not self._plain and self._text.strip():
                self._plain = not self._text.lstrip().startswith("{")
            start = self._call_start()
            if start is not None:  # (without an opener: only whitespace before, not content)
                send = self._text[:start] if opener else ""
                self._text, self._calling = self._text[start:], True
            else:  # text, less what may still begin the calls
                cut = len(self._text) - (0 if final else self._undecided())
                send, self._text = self._text[:cut], self._text[cut:]
        if not (final and self._calling):
            return {"content": send}
        content, calls = answer_calls(self.choice, self.parser, self._text, self.parallel)
        if not calls:
            return {"content": send + (content or "")}
        self.called = True
        return _deltas(calls, content=send or None)

    def _call_start(self) -> int | None:
        """Where the calls begin in the held text (None: not there, or never: an answer
        without an opener that began as text)."""
        if self._opener is not None:
            start = self._text.find(self._opener)
            return None if start < 0 else start
        if self._plain or not self._text.strip():
            return None
        return len(self._text) - len(self._text.lstrip())

    def _undecided(self) -> int:
        """How much of the held text's end may still begin the calls: a proper prefix of
        the opener; without one, the answer's leading whitespace."""
        if self._opener is not None:
            return holdback(self._text, (self._opener,))
        return 0 if self._plain else len(self._text)


def _deltas(calls: list[api.ToolCall], content: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta["tool_calls"] = [{"index": i, **call.model_dump()} for i, call in enumerate(calls)]
    return delta


def template_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's history `tool_calls` as chat templates read them: the
    arguments as an object, not OpenAI's JSON text (transformers' convention for
    tool-use templates; vLLM converts them the same way). An empty list (an SDK reply
    dumped back) is no calls: templates test for the key (Llama 3.1's does)."""
    if not message.get("tool_calls"):
        return {k: v for k, v in message.items() if k != "tool_calls"}
    calls = []
    for call in message["tool_calls"]:
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
    return {**message, "tool_calls": calls}


def _shown(choice: ToolChoice) -> str:
    return repr(choice.model_dump() if isinstance(choice, api.NamedToolChoice) else choice)
