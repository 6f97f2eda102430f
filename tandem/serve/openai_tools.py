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
  its own `[TOOL_CALLS]` (v11 and later; `name[CALL_ID]id[ARGS]{...}` where the template
  writes the call's id, whose id is then kept); text before it is the content. Its call
  ids are nine letters and digits, the only ids Mistral's templates take back as history.
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
from tandem.serve.json_stream import JsonValueStream
from tandem.serve.structured import StructuredOutput

# the schema of a function that declares no parameters: an empty object, as OpenAI's
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolChoice = str | api.NamedToolChoice | None

_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_MISTRAL_OPEN = "[TOOL_CALLS]"
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")  # the only call ids Mistral's templates take

# (name, arguments, the model's own call id or None) of each call; raises ValueError,
# KeyError, TypeError or AttributeError on text that is not calls
_Calls = list[tuple[str, Any, str | None]]


def _hermes_calls(text: str) -> _Calls:
    found = [json.loads(closed or open_) for closed, open_ in _HERMES_CALL.findall(text)]
    return [(c["name"], c.get("arguments"), None) for c in found]


def _llama3_calls(text: str) -> _Calls:
    calls, decoder, i = [], json.JSONDecoder(), 0
    while i < len(text):
        found, i = decoder.raw_decode(text, i)
        calls.append((found["name"], found.get("parameters", found.get("arguments")), None))
        i = len(text) - len(text[i:].lstrip().removeprefix(";").lstrip())
    return calls


def _mistral_calls(text: str) -> _Calls:
    body = text.removeprefix(_MISTRAL_OPEN).lstrip()
    if body.startswith("["):  # tokenizers before v11: one JSON array (what follows it ignored)
        found, _ = json.JSONDecoder().raw_decode(body)
        return [(c["name"], c.get("arguments"), None) for c in found]
    calls = []
    for raw in text.split(_MISTRAL_OPEN)[1:]:  # v11 and later: name[CALL_ID]id[ARGS]{...}
        brace = raw.index("{")
        arguments, _ = json.JSONDecoder().raw_decode(raw, brace)
        name, _, call_id = raw[:brace].replace("[ARGS]", "").partition("[CALL_ID]")
        call_id = call_id.strip()
        calls.append((name.strip(), arguments, call_id if _MISTRAL_ID.fullmatch(call_id) else None))
    return calls


def _openai_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _mistral_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


# where a streamed call's arguments begin: after its name (a JSON string, or Mistral's bare
# name), at the `{` that opens them
_NAME = r'"(?P<name>(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*)"'


def _object_head(arguments_key: str) -> str:
    return rf'\{{\s*"name"\s*:\s*{_NAME}\s*,\s*"(?:{arguments_key})"\s*:\s*(?=\{{)'


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """Where the calls' names and arguments sit in a format's text, for streaming them:
    `first` reads from the calls' start to the first call's arguments, `next` from the end
    of one call's arguments to the next one's; each captures the name. Calls written
    otherwise (another key order) are sent whole once the answer is."""

    first: re.Pattern[str]
    next: re.Pattern[str]


def _layout(first: str, between: str, head: str) -> CallLayout:
    return CallLayout(re.compile(first + head), re.compile(between + head))


@dataclasses.dataclass(frozen=True)
class CallFormat:
    """How a model family writes tool calls in its answer (a `--tool-call-parser`)."""

    # the text that opens the calls, anywhere after the content; None: the answer is the
    # calls or text, as its first character says (`{`: calls)
    opener: str | None
    calls: Callable[[str], _Calls]  # the calls' text, from the opener on
    layouts: tuple[CallLayout, ...]  # the first one the calls' text matches streams them
    new_id: Callable[[], str] = _openai_id
    keeps_special_tokens: bool = False  # the opener is a special token


_MISTRAL_V11_HEAD = (
    rf"\[TOOL_CALLS\]\s*(?P<bare>[\w.-]+)\s*(?:\[CALL_ID\]\s*(?P<id>{_MISTRAL_ID.pattern})\s*)?"
    r"(?:\[ARGS\])?\s*(?=\{)"
)
FORMATS: dict[str, CallFormat] = {
    "hermes": CallFormat(
        "<tool_call>",
        _hermes_calls,
        (
            _layout(
                r"<tool_call>\s*",
                r"\s*\}\s*</tool_call>\s*<tool_call>\s*",
                _object_head("arguments"),
            ),
        ),
    ),
    "llama3_json": CallFormat(
        None,
        _llama3_calls,
        (_layout(r"\s*", r"\s*\}\s*;\s*", _object_head("parameters|arguments")),),
    ),
    "mistral": CallFormat(
        _MISTRAL_OPEN,
        _mistral_calls,
        (
            _layout(r"\[TOOL_CALLS\]\s*\[\s*", r"\s*\}\s*,\s*", _object_head("arguments")),
            _layout("", r"\s*", _MISTRAL_V11_HEAD),
        ),
        _mistral_id,
        keeps_special_tokens=True,
    ),
}
# "required": a JSON array of {"name": ..., "parameters": {...}} (tool_grammar's order)
_REQUIRED_LAYOUT = _layout(r"\s*\[\s*", r"\s*\}\s*,\s*", _object_head("parameters"))


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


def _new_id(parser: str) -> Callable[[], str]:
    """Call ids of the served family's kind (OpenAI's without a parser)."""
    return FORMATS[parser].new_id if parser else _openai_id


def _call(parser: str, name: str, arguments: str, call_id: str | None = None) -> api.ToolCall:
    """A call; its id the model's own if it wrote one (Mistral's `[CALL_ID]`), else new."""
    return api.ToolCall(
        id=call_id or _new_id(parser)(), function=api.FunctionCall(name=name, arguments=arguments)
    )


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
        calls = [
            _call(parser, name, _arguments(args), call_id)
            for name, args, call_id in form.calls(text[start:])
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return text[:start] if form.opener and start else None, calls


def _arguments(value: Any) -> str:
    if not isinstance(value, dict | None):
        raise TypeError("arguments must be an object")
    return json.dumps(value or {}, ensure_ascii=False)


class ToolCallStream:
    """One streamed choice's deltas under a tool_choice that answers in calls, as OpenAI
    streams them: each call is announced (index, id, name) once its name has decoded, and
    its arguments follow as they decode, re-written as the answer returned whole writes
    them (`json.dumps`; json_stream), so that they add up to the same. A named call
    streams its text as its arguments; under "auto" the text streams as content until the
    calls begin (in `parser`'s format). `called`: calls were sent (then the finish reason is
    "tool_calls" for "auto" and "required", as OpenAI's)."""

    def __init__(self, choice: ToolChoice, parser: str = "", parallel: bool = True) -> None:
        self.choice = choice
        self.parser = parser
        self.parallel = parallel
        self._held = ""  # "auto": the end of the text, which may still begin the calls
        self._plain = False  # "auto" without an opener: the answer began as text, no calls
        # "auto": the text that opens the calls (None: the answer opens with them)
        self._opener = FORMATS[parser].opener if choice == "auto" else None
        self._named: api.ToolCall | None = None  # the named call, once announced
        self._calls: _CallsStream | None = None  # "required"; "auto" once the calls begin
        if choice == "required":
            self._calls = _CallsStream((_REQUIRED_LAYOUT,), _new_id(parser), parallel)

    @property
    def called(self) -> bool:
        return self._calls is not None and self._calls.sent > 0

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """The chunk's `delta` for `text`, the answer's new characters."""
        if isinstance(self.choice, api.NamedToolChoice):
            if self._named is None:
                self._named = _call(self.parser, self.choice.function.name, text)
                return {"tool_calls": _entries([self._named])}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        content = ""
        if self._calls is None:
            content, text = self._content(text, final)
            if self._calls is None:
                return {"content": content}
        entries = self._calls.push(text)
        if final:
            parsed_content, calls = answer_calls(
                self.choice, self.parser, self._calls.text, self.parallel
            )
            if not calls and not self.called:  # no calls after all: text
                content += parsed_content or ""
            entries += _entries(calls[self._calls.sent :], self._calls.sent)
            self._calls.sent = max(self._calls.sent, len(calls))
        delta: dict[str, Any] = {"content": content} if content else {}
        return {**delta, "tool_calls": entries} if entries else delta

    def _content(self, text: str, final: bool) -> tuple[str, str]:
        """Before the calls of an "auto" answer: (the content to send, the calls' text if
        they began here); the text that may still begin the calls is held back."""
        self._held += text
        if self._opener is None and not self._plain and self._held.strip():
            self._plain = not self._held.lstrip().startswith("{")
        start = self._call_start()
        if start is None:
            cut = len(self._held) - (0 if final else self._undecided())
            content, self._held = self._held[:cut], self._held[cut:]
            return content, ""
        content = self._held[:start] if self._opener else ""  # not the whitespace before `{`
        form = FORMATS[self.parser]
        self._calls = _CallsStream(form.layouts, form.new_id, self.parallel)
        return content, self._held[start:]

    def _call_start(self) -> int | None:
        """Where the calls begin in the held text (None: not there, or never: an answer
        without an opener that began as text)."""
        if self._opener is not None:
            start = self._held.find(self._opener)
            return None if start < 0 else start
        if self._plain or not self._held.strip():
            return None
        return len(self._held) - len(self._held.lstrip())

    def _undecided(self) -> int:
        """How much of the held text's end may still begin the calls: a proper prefix of
        the opener; without one, the answer's leading whitespace."""
        if self._opener is not None:
            return holdback(self._held, (self._opener,))
        return 0 if self._plain else len(self._held)


class _CallsStream:
    """The calls' text read as it decodes, in the first of `layouts` it matches: each call
    announced once its name has decoded, then its arguments re-written piece by piece.
    Text off the layout is left to the whole answer's parse (ToolCallStream, at the end);
    without `parallel` the first call is the only one."""

    def __init__(
        self, layouts: tuple[CallLayout, ...], new_id: Callable[[], str], parallel: bool
    ) -> None:
        self.text = ""  # the calls' text so far
        self.sent = 0  # calls announced
        self._unread = ""
        self._layouts = layouts  # until the first call picks one
        self._arguments: JsonValueStream | None = None  # the last call's, until they end
        self._new_id = new_id
        self._parallel = parallel

    def push(self, text: str) -> list[dict[str, Any]]:
        """The `tool_calls` entries of a delta for `text`, the calls' new characters."""
        self.text += text
        self._unread += text
        entries: list[dict[str, Any]] = []
        while self._layouts:
            if self._arguments is not None:
                piece = self._arguments.push(self._unread)
                self._unread = ""
                if piece and entries and entries[-1]["index"] == self.sent - 1:
                    entries[-1]["function"]["arguments"] += piece
                elif piece:
                    entries.append({"index": self.sent - 1, "function": {"arguments": piece}})
                if self._arguments.rest is None:
                    break
                self._unread, self._arguments = self._arguments.rest, None
                if not self._parallel:
                    self._layouts = ()  # the one call has been read
            else:
                head = self._head()
                if head is None:
                    break
                self._announce(head, entries)
        return entries

    def _announce(self, head: re.Match[str], entries: list[dict[str, Any]]) -> None:
        found = head.groupdict()
        name = found.get("bare") or json.loads(f'"{found["name"]}"')
        function = {"name": name, "arguments": ""}
        call_id = found.get("id") or self._new_id()
        entries.append(
            {"index": self.sent, "id": call_id, "type": "function", "function": function}
        )
        self.sent += 1
        self._unread = self._unread[head.end() :]
        self._arguments = JsonValueStream()

    def _head(self) -> re.Match[str] | None:
        """The next call's name up to its arguments, in the chosen layout."""
        for layout in self._layouts:
            head = (layout.next if self.sent else layout.first).match(self._unread)
            if head is not None:
                self._layouts = (layout,)
                return head
        return None


def _entries(calls: list[api.ToolCall], start: int = 0) -> list[dict[str, Any]]:
    """Whole calls as a delta's `tool_calls`, numbered from `start`."""
    return [{"index": start + i, **call.model_dump()} for i, call in enumerate(calls)]


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
