"""A chat choice's answer (tandem/serve/openai_answer.py): thinking apart from content,
and tool calls parsed from the content after it, whole and streamed alike."""

from __future__ import annotations

import json

from tandem.serve.openai_answer import AnswerShape, AnswerStream, chat_message

CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
THOUGHT = "<think>\nThe user wants the time; <tool_call> is how I ask.\n</think>\n\n"


def _streamed(shape: AnswerShape, pieces: list[str], finish: str) -> tuple[dict, str]:
    """What a client assembles from the deltas, and the last chunk's finish reason."""
    stream, got = AnswerStream(shape), {"reasoning": "", "reasoning_content": "", "content": ""}
    calls, reason = {}, None
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        delta = json.loads(json.dumps(stream.delta(piece, final)))
        for key in got:
            got[key] += delta.get(key) or ""
        for entry in delta.get("tool_calls", []):  # by index, as the SDK assembles them
            call = calls.setdefault(entry["index"], [entry["function"].get("name"), ""])
            call[1] += entry["function"]["arguments"]
        reason = stream.finish_reason(finish if final else None)
    got["tool_calls"] = [tuple(call) for call in calls.values()]
    return got, reason


def test_thinking_then_a_call_whole_and_streamed() -> None:
    """The thinking may mention the call tag: only the content after it is parsed (the
    blank line before the call is content, as vLLM's hermes parser leaves it)."""
    shape = AnswerShape(calls="auto", tool_parser="hermes", thinks=True)
    answer, reason = chat_message(THOUGHT + CALL, "stop", shape)
    assert reason == "tool_calls" and answer.content == "\n\n"
    assert answer.reasoning == answer.reasoning_content == THOUGHT[7:-10]
    assert [(c.function.name, c.function.arguments) for c in answer.tool_calls] == [
        ("get_time", "{}")
    ]
    text = THOUGHT + CALL
    for size in (1, 5, len(text)):
        got, reason = _streamed(
            shape, [text[i : i + size] for i in range(0, len(text), size)], "stop"
        )
        assert reason == "tool_calls"
        assert got == {"reasoning": answer.reasoning, "reasoning_content": answer.reasoning,
                       "content": "\n\n", "tool_calls": [("get_time", "{}")]}  # fmt: skip


def test_text_answers_and_the_thinking_left_out() -> None:
    shape = AnswerShape(thinks=True)
    answer, reason = chat_message("Hmm.</think>Noon.", "stop", shape)
    assert (answer.reasoning, answer.content, answer.tool_calls, reason) == (
        "Hmm.",
        "Noon.",
        None,
        "stop",
    )
    answer, _ = chat_message("Hmm, it is", "length", shape)  # cut short while thinking
    assert (answer.reasoning, answer.content) == ("Hmm, it is", None)
    quiet = AnswerShape(thinks=True, include_reasoning=False)
    answer, _ = chat_message("Hmm.</think>Noon.", "stop", quiet)
    assert (answer.reasoning, answer.reasoning_content, answer.content) == (None, None, "Noon.")
    got, _ = _streamed(quiet, ["Hmm.</th", "ink>Noon."], "stop")
    assert got["reasoning"] == "" and got["content"] == "Noon."
    assert (
        chat_message("<think>x</think>y", "stop", AnswerShape())[0].content == "<think>x</think>y"
    )
