"""Tool calls (tandem/serve/openai_tools.py): parsed out of "auto" answers, whole and
streamed (what the model writes in its family's format becomes `tool_calls`, and text
that is not a call stays content); the grammar of "required"; finish reasons; history."""

from __future__ import annotations

import json
import random

import llguidance
import pytest

from tandem.serve import openai_protocol as api
from tandem.serve.openai_tools import (
    ToolCallStream,
    answer_calls,
    finish_reason,
    parse_auto,
    template_tool_calls,
    tool_grammar,
)

CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("It is sunny.", "It is sunny.", []),
        (f"<tool_call>\n{CALL}\n</tool_call>", None, [("get_weather", {"city": "Oslo"})]),
        (f"Checking.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n"
         '{"name": "get_time", "arguments": {}}\n</tool_call>', "Checking.\n",
         [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
        (f"<tool_call>\n{CALL}", None, [("get_weather", {"city": "Oslo"})]),  # unclosed, at the end
        ("<tool_call>\n{\"name\": \"f\", \"arguments\": {", "<tool_call>\n{\"name\": \"f\", "
         "\"arguments\": {", []),  # cut short: text, as vLLM
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
         []),  # no name
    ],
)  # fmt: skip
def test_hermes(text, content, calls) -> None:
    got_content, got_calls = parse_auto("hermes", text)
    assert (got_content, _calls(got_calls)) == (content, calls)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("It is sunny.", "It is sunny.", []),
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
         [("get_weather", {"city": "Oslo"})]),
        (' {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"n": 2}}', None,
         [("a", {}), ("b", {"n": 2})]),
        ('{"name": "a", "parameters": {"n": ', '{"name": "a", "parameters": {"n": ', []),
        ('{"n": 1}', '{"n": 1}', []),
    ],
)  # fmt: skip
def test_llama3_json(text, content, calls) -> None:
    got_content, got_calls = parse_auto("llama3_json", text)
    assert (got_content, _calls(got_calls)) == (content, calls)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("It is sunny.", "It is sunny.", []),
        (f"[TOOL_CALLS] [{CALL}]", None, [("get_weather", {"city": "Oslo"})]),  # before v11
        (f'Checking. [TOOL_CALLS][{CALL}, {{"name": "get_time", "arguments": {{}}}}]</s>',
         "Checking. ", [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time{}', None,
         [("get_weather", {"city": "Oslo"}), ("get_time", {})]),  # v11 and later
        ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Oslo"}', None,
         [("get_weather", {"city": "Oslo"})]),  # with the call's id
        ("[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {", "[TOOL_CALLS] [{\"name\": \"f\", "
         "\"arguments\": {", []),  # cut short: text
        ("[TOOL_CALLS]get_time", "[TOOL_CALLS]get_time", []),  # no arguments yet
    ],
)  # fmt: skip
def test_mistral(text, content, calls) -> None:
    got_content, got_calls = parse_auto("mistral", text)
    assert (got_content, _calls(got_calls)) == (content, calls)
    # the only ids Mistral's templates take back: nine letters and digits, the model's own
    # where it wrote one
    assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)
    assert ("a1B2c3D4e" in text) == any(c.id == "a1B2c3D4e" for c in got_calls)


def _stream(
    parser: str, chunks: list[str], choice: str = "auto", parallel: bool = True
) -> tuple[str, list[tuple[str, str]], bool]:
    """What a client assembles from the deltas, as the SDK does (by index, the arguments
    joined): the content, the calls' (name, arguments), whether it called."""
    stream = ToolCallStream(choice, parser, parallel)
    content, calls = "", {}
    for i, chunk in enumerate(chunks):
        delta = stream.delta(chunk, final=i == len(chunks) - 1)
        content += delta.get("content") or ""
        for entry in delta.get("tool_calls", []):
            if entry["index"] not in calls:  # the first entry announces the call
                assert entry["id"] and entry["type"] == "function" and "name" in entry["function"]
                calls[entry["index"]] = {"name": entry["function"]["name"], "arguments": ""}
            else:
                assert "id" not in entry and "name" not in entry["function"]
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    assert list(calls) == list(range(len(calls)))
    return content, [(c["name"], c["arguments"]) for c in calls.values()], stream.called


def _chunkings(text: str) -> list[list[str]]:
    rng = random.Random(0)
    random_cuts = sorted(rng.sample(range(1, len(text)), 12))
    return [
        list(text),
        [text[i : i + 5] for i in range(0, len(text), 5)],
        [text[i:j] for i, j in zip([0, *random_cuts], [*random_cuts, len(text)], strict=True)],
        [text],
    ]


STREAMED = [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
     '"days": [1, 2.50], "note": "\\"q\\" \\u00e9 ;,}"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("llama3_json", ' {"name": "a", "parameters": {"n": 1e3, "s": "x;y"}}; '
     '{"name": "b", "arguments": {"deep": {"l": [[], {}]}}}'),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"q": [true, null]}}, '
     '{"name": "g", "arguments": {}}]</s>'),  # before v11
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}'),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Oslo"}'
     '[TOOL_CALLS]get_time[CALL_ID]Zz9Yy8Xx7[ARGS]{}'),  # with the calls' ids
]  # fmt: skip


@pytest.mark.parametrize(("parser", "text"), STREAMED)
def test_auto_calls_stream_their_arguments_and_add_up_to_the_whole_answer(parser, text) -> None:
    content, calls = parse_auto(parser, text)
    whole = (content or "", [(c.function.name, c.function.arguments) for c in calls], True)
    assert len(whole[1]) == 2
    for chunks in _chunkings(text):
        assert _stream(parser, chunks) == whole
    # the first call's name and the start of its arguments are sent before its end
    name, arguments = whole[1][0]
    cut = text.index("{", text.index(name)) + 5  # inside its arguments
    _, partial, called = _stream(parser, [text[:cut], ""])
    assert called and partial[0][0] == name and "" < partial[0][1] < arguments
    assert arguments.startswith(partial[0][1])
    # without parallel calls, the first only
    assert _stream(parser, list(text), parallel=False) == (whole[0], whole[1][:1], True)


def test_streamed_mistral_calls_keep_the_ids_the_model_wrote() -> None:
    text = STREAMED[-1][1]
    stream = ToolCallStream("auto", "mistral")
    deltas = [stream.delta(c, final=i == len(text) - 1) for i, c in enumerate(text)]
    ids = [e["id"] for d in deltas for e in d.get("tool_calls", []) if "id" in e]
    assert ids == ["a1B2c3D4e", "Zz9Yy8Xx7"]


def test_calls_off_the_streamed_layout_are_sent_whole() -> None:
    text = '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'  # arguments first
    assert _stream("hermes", list(text)) == ("", [("f", '{"a": 1}')], True)
    # text that only looked like the tag's start is released, nothing is lost
    assert _stream("hermes", ["a <", "tool", "box>", " b"]) == ("a <toolbox> b", [], False)
    assert _stream("llama3_json", ["Hi", ' {"name": "x"}']) == ('Hi {"name": "x"}', [], False)
    assert _stream("mistral", ["a [TOOL", "S] b"]) == ("a [TOOLS] b", [], False)
    # calls that never parse are text, as the whole answer's
    assert _stream("hermes", list("<tool_call>{oops}")) == ("<tool_call>{oops}", [], False)
    for bad_name in ['"\\q"', '"\n"']:  # a bad escape, a control character: not JSON
        text = f'<tool_call>{{"name": {bad_name}, "arguments": {{}}}}</tool_call>'
        assert _stream("hermes", list(text)) == (text, [], False)
    # cut short inside the arguments, a streamed call keeps what was sent
    assert _stream("hermes", list('<tool_call>{"name": "f", "arguments": {"a": "b')) == (
        "",
        [("f", '{"a": "b')],
        True,
    )


def test_required_calls_stream_as_auto_calls_do() -> None:
    text = (
        '[{"name":"get_time","parameters":{}},{"name":"get_weather","parameters":{"city":"Rome"}}]'
    )
    calls = [(c.function.name, c.function.arguments) for c in answer_calls("required", "", text)[1]]
    assert calls == [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]
    for chunks in _chunkings(text):
        assert _stream("", chunks, "required") == ("", calls, True)
    # cut short before any call: text, as the whole answer
    assert _stream("", ['[{"name":"ge'], "required") == ('[{"name":"ge', [], False)


def test_a_stream_holds_back_only_what_may_begin_a_call() -> None:
    stream = ToolCallStream("auto", "hermes")
    assert stream.delta("Sure <to", final=False) == {"content": "Sure "}
    assert stream.delta("day", final=False) == {"content": "<today"}


def _tool(name: str, parameters: dict | None = None) -> api.Tool:
    function = {"name": name} | ({} if parameters is None else {"parameters": parameters})
    return api.Tool.model_validate({"type": "function", "function": function})


def test_required_grammar_keeps_each_tools_refs_and_one_call_when_not_parallel() -> None:
    """pydantic-made schemas point into their `$defs`: nested in the array's schema
    those move to its root, or the `$ref`s would dangle (llguidance refuses them)."""
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    where = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}},
             "required": ["at"], "$defs": {"Place": place}}  # fmt: skip
    tools = [_tool("where", where), _tool("now")]
    for parallel in (True, False):
        output = tool_grammar(tools, "required", parallel)
        schema = json.loads(output.spec)
        assert schema["$defs"] == {"Place": place} and schema.get("maxItems") == (
            None if parallel else 1
        )
        assert llguidance.LLMatcher.validate_grammar(output.grammar()) == ""
    clash = _tool("other", {"type": "object", "$defs": {"Place": {"type": "integer"}}})
    with pytest.raises(ValueError, match="tools=.*Place"):
        tool_grammar([*tools, clash], "required")


def test_answers_finish_reasons_and_parallel_calls() -> None:
    named = api.NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}})
    assert finish_reason(named, "stop") == "stop"  # a named call: as OpenAI's
    assert finish_reason("required", "stop") == finish_reason("auto", "stop") == "tool_calls"
    assert finish_reason("auto", "length") == "length"
    two = f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>"
    assert len(answer_calls("auto", "hermes", two)[1]) == 2
    assert len(answer_calls("auto", "hermes", two, parallel=False)[1]) == 1
    assert answer_calls("required", "", '[{"name": "f"}]') == ('[{"name": "f"}]', [])
    # ids of the served family's kind whatever the choice; OpenAI's without a parser
    assert answer_calls(named, "", "{}")[1][0].id.startswith("call_")
    (call,) = answer_calls(named, "mistral", "{}")[1]
    assert len(call.id) == 9 and call.id.isalnum()


def test_history_tool_calls_reach_the_template_as_objects() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    message = {"role": "assistant", "tool_calls": [call]}
    assert template_tool_calls(message)["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    # an SDK reply dumped back carries `tool_calls: []` or null: no key, as templates test it
    assert template_tool_calls({"role": "assistant", "content": "x", "tool_calls": []}) == {
        "role": "assistant",
        "content": "x",
    }


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", ""])
def test_streams_of_any_text_raise_nothing(parser) -> None:
    """Fragments of each format in random order and chunks, often after the start of a
    call: whatever the model writes, the stream yields deltas (text or calls), never an
    error."""
    heads = {"hermes": "<tool_call>{", "llama3_json": "{", "mistral": "[TOOL_CALLS][{", "": "[{"}
    fragments = ['<tool_call>', '</tool_call>', '[TOOL_CALLS]', '[ARGS]', '[CALL_ID]',
                 'a1B2c3D4e', '"name": ', '"f\\u00e9"', '"\\q"', '"\n"', '"\\ud800"',
                 ', "arguments": ', ', "parameters": ', '{', '}', '[', ']', ',', ':', ';', '1e',
                 '2', '"x"', 'null', ' ', 'text', 'f', '"name": "f", "arguments": ',
                 '"name": "\\q", "arguments": ', '"name": "\n", "parameters": ']  # fmt: skip
    rng = random.Random(0)
    for _ in range(1000):
        text = heads[parser] if rng.random() < 0.5 else ""
        text += "".join(rng.choice(fragments) for _ in range(rng.randrange(1, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        _stream(parser, chunks, "auto" if parser else "required")
