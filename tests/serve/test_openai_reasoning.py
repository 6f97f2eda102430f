"""A reasoning model's thinking apart from its answer (tandem/serve/openai_reasoning.py),
whole and streamed in any chunking, as vLLM's deepseek_r1 and qwen3 parsers split it."""

from __future__ import annotations

import random

import pytest

from tandem.serve.openai_reasoning import ReasoningStream, split_reasoning, thinks


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nHmm.\n</think>\n\nHello!", "\nHmm.\n", "\n\nHello!"),  # Qwen3: opens it
        ("Hmm.</think>Hello!", "Hmm.", "Hello!"),  # the template opened it (DeepSeek-R1)
        ("<think>Hmm, 1 < 2.", "Hmm, 1 < 2.", None),  # cut short: all thinking
        ("Hmm.</think>", "Hmm.", None),
        ("<think></think>Hi", None, "Hi"),
        ("a</think>b</think>c", "a", "b</think>c"),  # only the first closes it
        ("Hmm <think> x</think>ok", "Hmm  x", "ok"),  # the opening tag dropped where it is
    ],
)
def test_split(text, reasoning, content) -> None:
    assert split_reasoning(text) == (reasoning, content)


def test_a_stream_in_any_chunking_splits_as_the_whole_answer() -> None:
    rng = random.Random(0)
    texts = ["<think>\nHmm.\n</think>\n\nHello!", "Hmm.</think>Hello </think>!", "<thi", "x</th"]
    for text in texts:
        whole = split_reasoning(text)
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            stream, reasoning, content = ReasoningStream(), "", ""
            for i, piece in enumerate(pieces):
                r, c = stream.push(piece, final=i == len(pieces) - 1)
                reasoning, content = reasoning + r, content + c
            assert (reasoning or None, content or None) == whole, pieces


def test_a_stream_holds_back_only_what_may_be_a_tag() -> None:
    stream = ReasoningStream()
    assert stream.push("I think </th") == ("I think ", "")
    assert stream.push("ink>Yes") == ("", "Yes")
    stream = ReasoningStream()
    assert stream.push("a <b") == ("a <b", "")  # not a prefix of either tag
    assert stream.push("c <") == ("c ", "") and stream.push("d", final=True) == ("<d", "")


def test_qwen3_thinks_unless_the_request_turns_it_off() -> None:
    assert thinks("qwen3", None) and thinks("qwen3", {"enable_thinking": True})
    assert not thinks("qwen3", {"enable_thinking": False})
    assert thinks("deepseek_r1", {"enable_thinking": False})  # not a switch of R1's template
    assert not thinks("", None)
    # continuing a message (continue_final_message): only from inside a think block
    assert thinks("deepseek_r1", None, "<think>\nHmm") and thinks(
        "qwen3", None, "a</think><think>b"
    )
    assert not thinks("qwen3", None, "<think>Hmm</think>The answer is")
    assert not thinks("qwen3", None, "The answer is") and not thinks("", None, "<think>")
