"""A JSON value re-written as it arrives (tandem/serve/json_stream.py): whatever the
chunking and however the text is spaced or escaped, the pieces add up to what
`json.dumps(json.loads(text), ensure_ascii=False)` writes (Python's json is the oracle),
what follows the value is kept, and text that is not JSON stops the re-writing."""

from __future__ import annotations

import json
import random

import pytest

from tandem.serve.json_stream import JsonValueStream

_CHARACTERS = 'ab "\\/\n\t\x01é😀\u2028{}[],:0'


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([0, -7, 10**20, 1.5, -0.25, 1e-7, 3.0, 2.5e20, True, False, None])
    if kind < 5:
        return "".join(rng.choice(_CHARACTERS) for _ in range(rng.randrange(6)))
    if kind < 7:
        return {
            f"k{i}{rng.choice(_CHARACTERS)}": _value(rng, depth + 1)
            for i in range(rng.randrange(4))
        }
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _push_in_chunks(text: str, rng: random.Random) -> tuple[JsonValueStream, list[str]]:
    stream, pieces, i = JsonValueStream(), [], 0
    while i < len(text):
        size = rng.randrange(1, 7)
        pieces.append(stream.push(text[i : i + size]))
        i += size
    return stream, pieces


@pytest.mark.parametrize("seed", range(4))
def test_pieces_add_up_to_json_dumps_of_the_whole(seed) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        value = {"a": _value(rng), "b": [_value(rng)]}
        text = json.dumps(
            value,
            ensure_ascii=rng.random() < 0.5,  # \u escapes, surrogate pairs split across chunks
            indent=rng.choice([None, 2]),
            separators=rng.choice([None, (",", ":")]),
        )
        after = rng.choice(["", "}", "\n</tool_call>"])
        stream, pieces = _push_in_chunks(text + after, rng)
        assert "".join(pieces) == json.dumps(value, ensure_ascii=False)
        assert (stream.rest, stream.failed) == (after, False)


def test_pieces_are_sent_as_they_complete() -> None:
    stream = JsonValueStream()
    assert stream.push('{"code": "def f') == '{"code": "def f'  # a string streams as it decodes
    assert stream.push("():\\") == "():"  # an escape waits for its end
    assert stream.push('n", "n": 12') == '\\n", "n": '  # a number waits for what ends it
    assert stream.push("} tail") == "12}"
    assert (stream.rest, stream.push(" more")) == (" tail", "")
    assert stream.rest == " tail more"


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1x}', '{"a": "\x01"}', '{"a": "\\q"}', '"s"', "5", "}", '{"a": tru}',
        "{: 1}", '{"a" 1}', "{1: 2}", '{"a": 1,}', '{"a": [1}', "[1 2]",
    ],
)  # fmt: skip
def test_text_that_is_not_json_stops_the_rewriting(text) -> None:
    stream = JsonValueStream()
    stream.push(text)
    assert stream.failed and stream.rest is None and stream.push("}") == ""
