"""Checks tandem's "auto" tool-call parsing against vLLM's own parsers (`--tool-call-parser`
hermes, llama3_json, mistral), whole and streamed, on the same texts.

vLLM runs in its own venv (`--vllm-python`; see docs/benchmarks.md for building it): that
side tokenizes each text with a tokenizer of the family built here
(tests/model/hf_tokenizers.py: the families' conventions and special tokens), splits it
into the deltas a model would stream (token by token), and runs vLLM's parser on the whole
text and on the deltas (adding what vLLM's server adds at the end of a stream). This side feeds the same deltas to tandem's `ToolCallStream` and the whole text to
`parse_auto`. One JSON line per text: whether tandem's whole answer and streamed answer
(content, and each call's name and parsed arguments; ids are random) equal vLLM's, and
whether tandem's stream equals tandem's whole answer.

    PYTHONPATH=. .venv/bin/python scripts/check_tool_parsers_vs_vllm.py \
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

# (parser, tokenizer family, the model's answer)
CASES = [
    ("hermes", "qwen2.5", "It is sunny."),
    ("hermes", "qwen2.5", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Oslo", "days": [1, 2.50], "note": "\\"q\\" \\u00e9 ;,}"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("hermes", "qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'),
    ("hermes", "qwen2.5", '<tool_call>\n{"name": "f", "arguments": {'),  # cut short
    ("hermes", "qwen2.5", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'),
    ("hermes", "qwen2.5", "a <toolbox> b"),
    ("hermes", "qwen2.5", '<tool_call>\n{"name": "run", "arguments": {"code": '
     '"print(\\"hi\\")\\nx = {1: [2]}"}}\n</tool_call>'),
    ("llama3_json", "llama3", ' {"name": "a", "parameters": {"n": 1e3, "s": "x;y"}}; '
     '{"name": "b", "arguments": {"deep": {"l": [[], {}]}}}'),
    ("llama3_json", "llama3", 'Hi {"name": "x"}'),
    ("llama3_json", "llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    ("mistral", "mistral", 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"q": [true, null]}}, '
     '{"name": "g", "arguments": {}}]'),
    ("mistral", "mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    ("mistral", "mistral-v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'
     '[TOOL_CALLS]get_time[ARGS]{}'),
    ("mistral", "mistral-v11", 'Sure. [TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]'
     '{"city": "Oslo"}'),
]  # fmt: skip
# a v11+ Mistral tokenizer has these control tokens too (vLLM tells the formats apart by [ARGS])
_V11_TOKENS = ["[ARGS]", "[CALL_ID]"]


def _vllm_side(tokenizers: Path) -> list[dict[str, Any]]:
    """Runs in vLLM's venv: each case's deltas and vLLM's whole and streamed answers."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    names = ["get_weather", "get_time", "f", "g", "a", "b", "x", "run"]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in names]  # fmt: skip
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools
    )
    results = []
    for parser, family, text in CASES:
        tok = AutoTokenizer.from_pretrained(tokenizers / family.removesuffix("-v11"))
        if family.endswith("-v11"):
            tok.add_special_tokens({"additional_special_tokens": _V11_TOKENS})
        cls = ToolParserManager.get_tool_parser(parser)
        whole = cls(tok, request.tools).extract_tool_calls(text, request)
        ids = tok.encode(text, add_special_tokens=False)
        deltas, before = [], ""
        for i in range(1, len(ids) + 1):
            now = tok.decode(ids[:i], skip_special_tokens=False)
            deltas.append(now[len(before) :])
            before = now
        assert "".join(deltas) == text, text
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
                got = calls.setdefault(call.index, {"name": None, "arguments": ""})
                got["name"] = got["name"] or (call.function and call.function.name)
                got["arguments"] += (call.function and call.function.arguments) or ""
        results.append({
            "deltas": deltas,
            "whole": [whole.content if whole.tools_called else text,
                      [[c.function.name, c.function.arguments] for c in whole.tool_calls]],
            "stream": [content, [[c["name"], c["arguments"]] for c in calls.values()]],
        })  # fmt: skip
    return results


def _comparable(content: str | None, calls: list[list[str]]) -> list[Any]:
    """An answer as compared: empty content as none, arguments parsed (raw if not JSON)."""

    def parsed(arguments: str) -> Any:
        try:
            return json.loads(arguments) if arguments else None
        except json.JSONDecodeError:
            return ["not JSON", arguments]

    return [content or None, [[name, parsed(arguments)] for name, arguments in calls]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument("--vllm-side", type=Path, help=argparse.SUPPRESS)  # the tokenizers' dir
    args = p.parse_args(argv)
    if args.vllm_side:
        json.dump(_vllm_side(args.vllm_side), sys.stdout)
        return 0

    from tandem.serve.openai_tools import ToolCallStream, parse_auto
    from tests.model.hf_tokenizers import build_tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        for family in {family.removesuffix("-v11") for _, family, _ in CASES}:
            build_tokenizer_dir(family, Path(tmp) / family)
        run = subprocess.run(
            [args.vllm_python, __file__, "--vllm-side", tmp],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    vllm = json.loads(run.stdout)
    for (parser, family, text), theirs in zip(CASES, vllm, strict=True):
        content, calls = parse_auto(parser, text)
        whole = _comparable(content, [[c.function.name, c.function.arguments] for c in calls])
        stream, streamed, got = ToolCallStream("auto", parser), "", {}
        for i, delta in enumerate(theirs["deltas"]):
            out = stream.delta(delta, final=i == len(theirs["deltas"]) - 1)
            streamed += out.get("content") or ""
            for call in out.get("tool_calls", ()):
                entry = got.setdefault(call["index"], [call["function"].get("name"), ""])
                entry[1] += call["function"]["arguments"]
        ours_streamed = _comparable(streamed, list(got.values()))
        line = {
            "parser": parser,
            "tokenizer": family,
            "text": text,
            "whole_equals_vllm": whole == _comparable(*theirs["whole"]),
            "stream_equals_vllm": ours_streamed == _comparable(*theirs["stream"]),
            "stream_equals_whole": ours_streamed == whole,
            "vllm_stream_equals_vllm_whole": (
                _comparable(*theirs["stream"]) == _comparable(*theirs["whole"])
            ),
        }
        if not line["whole_equals_vllm"] or not line["stream_equals_vllm"]:
            line |= {"tandem": [whole, ours_streamed], "vllm": [theirs["whole"], theirs["stream"]]}
        print(json.dumps(line, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
