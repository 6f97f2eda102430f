"""Checks tandem's OpenAI-API parsers against vLLM's own on the same texts, whole and
streamed: tool calls under "auto" (`--tool-call-parser` hermes, llama3_json, mistral) and
reasoning (`--reasoning-parser` qwen3, deepseek_r1).

vLLM runs in its own venv (`--vllm-python`; see docs/benchmarks.md for building it): that
side tokenizes each text with a tokenizer of the family built here
(tests/model/hf_tokenizers.py: the families' conventions and special tokens), splits it
into the deltas a model would stream (token by token), and runs vLLM's parser on the whole
text and on the deltas (adding what vLLM's server adds at the end of a stream). This side
runs tandem's (`parse_auto` / `ToolCallStream`, `split_reasoning` / `ReasoningStream`) on
the same text and deltas. One JSON line per text: whether tandem's whole and streamed
answers (reasoning, content, and each call's name and parsed arguments; call ids are
random) equal vLLM's, and whether each side's stream equals its own whole answer.

    PYTHONPATH=. .venv/bin/python scripts/check_parsers_vs_vllm.py \
        --vllm-python /tmp/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# (kind, parser, tokenizer family, the model's answer)
CASES = [
    ("tool", "hermes", "qwen2.5", "It is sunny."),
    ("tool", "hermes", "qwen2.5", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Oslo", "days": [1, 2.50], "note": "\\"q\\" \\u00e9 ;,}"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("tool", "hermes", "qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'),
    ("tool", "hermes", "qwen2.5", '<tool_call>\n{"name": "f", "arguments": {'),  # cut short
    ("tool", "hermes", "qwen2.5", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'),
    ("tool", "hermes", "qwen2.5", "a <toolbox> b"),
    ("tool", "hermes", "qwen2.5", '<tool_call>\n{"name": "run", "arguments": {"code": '
     '"print(\\"hi\\")\\nx = {1: [2]}"}}\n</tool_call>'),
    ("tool", "llama3_json", "llama3", ' {"name": "a", "parameters": {"n": 1e3, "s": "x;y"}}; '
     '{"name": "b", "arguments": {"deep": {"l": [[], {}]}}}'),
    ("tool", "llama3_json", "llama3", 'Hi {"name": "x"}'),
    ("tool", "llama3_json", "llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    ("tool", "mistral", "mistral", 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"q": [true, null]}}, '
     '{"name": "g", "arguments": {}}]'),
    ("tool", "mistral", "mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    ("tool", "mistral", "mistral-v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'
     '[TOOL_CALLS]get_time[ARGS]{}'),
    ("tool", "mistral", "mistral-v11", 'Sure. [TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]'
     '{"city": "Oslo"}'),
    ("reasoning", "qwen3", "qwen3", "<think>\nplan\n</think>\n\nHi!"),
    ("reasoning", "qwen3", "qwen3", "plan a bit</think>answer"),  # the template opened it
    ("reasoning", "qwen3", "qwen3", "<think>cut short"),
    ("reasoning", "qwen3", "qwen3", "no thinking at all"),
    ("reasoning", "qwen3", "qwen3", "<think></think>x"),
    ("reasoning", "qwen3", "qwen3", "a</think>b</think>c"),
    ("reasoning", "deepseek_r1", "qwen3", "<think>\nplan\n</think>\n\nHi!"),
    ("reasoning", "deepseek_r1", "qwen3", "plan a bit</think>answer"),
    ("reasoning", "deepseek_r1", "qwen3", "<think>cut short"),
    ("reasoning", "deepseek_r1", "qwen3", "<think></think>x"),
    ("reasoning", "deepseek_r1", "qwen3", "a</think>b</think>c"),
]  # fmt: skip

# a v11+ Mistral tokenizer has these control tokens too (vLLM tells the formats apart by [ARGS])
_V11_TOKENS = ["[ARGS]", "[CALL_ID]"]

# an answer as compared: [reasoning, content, [[name, arguments], ...]]
Answer = list[Any]


def _vllm_side(tokenizers: Path) -> list[dict[str, Any]]:
    """Runs in vLLM's venv: each case's deltas and vLLM's whole and streamed answers."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    names = ["get_weather", "get_time", "f", "g", "a", "b", "x", "run"]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in names]  # fmt: skip
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools
    )
    results = []
    for kind, parser, family, text in CASES:
        tok = AutoTokenizer.from_pretrained(tokenizers / family.removesuffix("-v11"))
        if family.endswith("-v11"):
            tok.add_special_tokens({"additional_special_tokens": _V11_TOKENS})
        ids = tok.encode(text, add_special_tokens=False)
        deltas, before = [], ""
        for i in range(1, len(ids) + 1):
            now = tok.decode(ids[:i], skip_special_tokens=False)
            deltas.append(now[len(before) :])
            before = now
        assert "".join(deltas) == text, text
        answers = (_vllm_tools if kind == "tool" else _vllm_reasoning)(
            parser, tok, request, text, ids, deltas
        )
        results.append({"deltas": deltas, "whole": answers[0], "stream": answers[1]})
    return results


def _vllm_tools(parser, tok, request, text, ids, deltas) -> tuple[Answer, Answer]:
    from vllm.tool_parsers import ToolParserManager

    cls = ToolParserManager.get_tool_parser(parser)
    whole = cls(tok, request.tools).extract_tool_calls(text, request)
    streaming, content, calls, seen = cls(tok, request.tools), "", {}, ""
    for i, delta in enumerate(deltas):
        message = streaming.extract_tool_calls_streaming(
            seen, seen + delta, delta, ids[:i], ids[: i + 1], ids[i : i + 1], request
        )
        seen += delta
        if message is None:
            continue
        if i == len(deltas) - 1 and message.tool_calls:  # vLLM's server at the end
            last = message.tool_calls[-1].function
            last.arguments = (last.arguments or "") + streaming.get_remaining_unstreamed_args()
        content += message.content or ""
        for call in message.tool_calls or ():
            got = calls.setdefault(call.index, [None, ""])
            got[0] = got[0] or (call.function and call.function.name)
            got[1] += (call.function and call.function.arguments) or ""
    whole_calls = [[c.function.name, c.function.arguments] for c in whole.tool_calls]
    return (
        [None, whole.content if whole.tools_called else text, whole_calls],
        [None, content, list(calls.values())],
    )


def _vllm_reasoning(parser, tok, request, text, ids, deltas) -> tuple[Answer, Answer]:
    from vllm.reasoning import ReasoningParserManager

    cls = ReasoningParserManager.get_reasoning_parser(parser)
    reasoning, content = cls(tok).extract_reasoning(text, request)
    streaming, streamed, seen = cls(tok), ["", ""], ""
    for i, delta in enumerate(deltas):
        message = streaming.extract_reasoning_streaming(
            seen, seen + delta, delta, ids[:i], ids[: i + 1], ids[i : i + 1]
        )
        seen += delta
        if message is not None:
            streamed[0] += message.reasoning or ""
            streamed[1] += message.content or ""
    return [reasoning, content, []], [*streamed, []]


def _tandem_tools(parser: str, text: str, deltas: list[str]) -> tuple[Answer, Answer]:
    from tandem.serve.openai_tools import ToolCallStream, parse_auto

    content, calls = parse_auto(parser, text)
    whole = [None, content, [[c.function.name, c.function.arguments] for c in calls]]
    stream, streamed, got = ToolCallStream("auto", parser), "", {}
    for i, delta in enumerate(deltas):
        out = stream.delta(delta, final=i == len(deltas) - 1)
        streamed += out.get("content") or ""
        for call in out.get("tool_calls", ()):
            entry = got.setdefault(call["index"], [call["function"].get("name"), ""])
            entry[1] += call["function"]["arguments"]
    return whole, [None, streamed, list(got.values())]


def _tandem_reasoning(text: str, deltas: list[str]) -> tuple[Answer, Answer]:
    """The answer opening with thinking (`thinks`: qwen3 with thinking on, deepseek_r1)."""
    from tandem.serve.openai_reasoning import ReasoningStream, split_reasoning

    stream, streamed = ReasoningStream(), ["", ""]
    for i, delta in enumerate(deltas):
        reasoning, content = stream.push(delta, final=i == len(deltas) - 1)
        streamed[0] += reasoning
        streamed[1] += content
    return [*split_reasoning(text), []], [*streamed, []]


def _comparable(answer: Answer) -> Answer:
    """Empty text as none, arguments parsed (kept raw if not JSON)."""

    def parsed(arguments: str) -> Any:
        try:
            return json.loads(arguments) if arguments else None
        except json.JSONDecodeError:
            return ["not JSON", arguments]

    reasoning, content, calls = answer
    return [reasoning or None, content or None, [[n, parsed(a)] for n, a in calls]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument("--vllm-side", type=Path, help=argparse.SUPPRESS)  # the tokenizers' dir
    args = p.parse_args(argv)
    if args.vllm_side:
        json.dump(_vllm_side(args.vllm_side), sys.stdout)
        return 0

    from tests.model.hf_tokenizers import build_tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        for family in {family.removesuffix("-v11") for _, _, family, _ in CASES}:
            build_tokenizer_dir(family, Path(tmp) / family)
        run = subprocess.run(
            [args.vllm_python, __file__, "--vllm-side", tmp],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    for (kind, parser, family, text), theirs in zip(CASES, json.loads(run.stdout), strict=True):
        deltas = theirs["deltas"]
        whole, streamed = (
            _tandem_tools(parser, text, deltas)
            if kind == "tool"
            else _tandem_reasoning(text, deltas)
        )
        ours = [_comparable(whole), _comparable(streamed)]
        vllm = [_comparable(theirs["whole"]), _comparable(theirs["stream"])]
        line = {
            "kind": kind,
            "parser": parser,
            "tokenizer": family,
            "text": text,
            "whole_equals_vllm": ours[0] == vllm[0],
            "stream_equals_vllm": ours[1] == vllm[1],
            "stream_equals_whole": ours[1] == ours[0],
            "vllm_stream_equals_vllm_whole": vllm[1] == vllm[0],
        }
        if ours != vllm:
            line |= {"tandem": ours, "vllm": vllm}
        print(json.dumps(line, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
