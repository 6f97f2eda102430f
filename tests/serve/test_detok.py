"""Stop strings and UTF-8: nothing of a stop string and no broken character is ever sent."""

from __future__ import annotations

import pytest

from tandem.model.tokenizer import IncrementalDetokenizer
from tandem.serve.detok import TextStream


class _Chunks:
    """A detokenizer that returns prepared text chunks, one per pushed token."""

    def __init__(self, chunks: list[str]) -> None:
        self._chunks = iter(chunks)

    def push(self, token_id: int) -> str:
        return next(self._chunks)

    def flush(self) -> str:
        return ""


def _run(chunks: list[str], stop: tuple[str, ...]) -> tuple[list[str], str | None, str]:
    stream = TextStream(_Chunks(chunks), stop)
    deltas, matched = [], None
    for i in range(len(chunks)):
        delta, matched = stream.push(i)
        deltas.append(delta)
        if matched:
            break
    if not matched:
        deltas.append(stream.finish())
    return deltas, matched, stream.text


@pytest.mark.parametrize(
    ("chunks", "stop", "text", "matched"),
    [
        (["hello", " wor", "ld"], ("world",), "hello ", "world"),  # across tokens
        (["ab", "cST", "O", "Pde"], ("STOP",), "abc", "STOP"),  # across three tokens
        (["xxSTOPyy"], ("STOP",), "xx", "STOP"),  # inside one token
        (["a", "S", "T", "x"], ("STOP",), "aSTx", None),  # partial then released
        (["a", "S", "T"], ("STOP",), "aST", None),  # partial at the end is real text
        (["12", "34"], ("23", "4"), "1", "23"),  # earliest match wins
        (["ab", "c"], ("bc", "abd"), "a", "bc"),  # overlapping candidates
        (["é", "t", "é"], ("té",), "é", "té"),  # non-ASCII stop
    ],
)
def test_stop_strings_never_emitted(chunks, stop, text, matched) -> None:
    deltas, got_matched, got_text = _run(chunks, stop)
    assert got_matched == matched
    assert got_text == text
    assert "".join(deltas) == text
    if matched:
        emitted = ""
        for d in deltas:  # no prefix of the stop is ever visible after the match point
            emitted += d
            assert matched not in emitted


def test_holdback_is_minimal() -> None:
    stream = TextStream(_Chunks(["abS", "Tx"]), ("STOP",))
    assert stream.push(0) == ("ab", None)  # only the possible stop start is held
    assert stream.push(1) == ("STx", None)


def test_min_tokens_holds_back_stop_strings_as_vllm_does() -> None:
    """No stop string ends the text before token min_tokens + 1; that token may complete
    one begun earlier, as vLLM v1's detokenizer checks the new text and the stop's
    length before it."""
    chunks = ["a\n", "b\n", "c", "\n", "d"]
    stream = TextStream(_Chunks(chunks), ("\n",), min_tokens=2)
    assert [stream.push(i) for i in range(3)] == [("a\n", None), ("b\n", None), ("c", None)]
    assert stream.push(3) == ("", "\n")
    stream = TextStream(_Chunks(["xS", "TO", "P"]), ("STOP",), min_tokens=2)
    assert [stream.push(i) for i in range(3)] == [("x", None), ("", None), ("", "STOP")]
    # a stop that ended within the first min_tokens tokens, held back as the start of a
    # longer one, never ends the text later: only a match ending in the new text counts
    stream = TextStream(_Chunks(["a", "##", "b", "c"]), ("###", "##"), min_tokens=2)
    assert [stream.push(i) for i in range(4)] == [
        ("a", None), ("", None), ("##b", None), ("c", None)
    ]  # fmt: skip


def test_utf8_split_characters_never_broken(tokenizer) -> None:
    text = "héllo 世界 🎉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    stream = TextStream(IncrementalDetokenizer(tokenizer), ("界 🎉",))
    out = []
    for t in ids:
        delta, matched = stream.push(t)
        assert "\ufffd" not in delta
        out.append(delta)
        if matched:
            break
    assert matched == "界 🎉"
    assert "".join(out) == "héllo 世"
