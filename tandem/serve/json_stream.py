"""A JSON value re-written as its text arrives, in the form `json.dumps(value,
ensure_ascii=False)` gives the whole parsed value: streamed tool-call arguments then add
up, delta by delta, to the arguments of the same answer returned whole. Each piece is
final once sent (vLLM instead diffs `json.dumps` of re-parsed partial objects, which has to
guess how far a partial string or number is stable)."""

from __future__ import annotations

import json
import re

_WHITESPACE = " \t\n\r"
_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')  # a string's characters up to an escape or its end
_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_SCALAR = re.compile(r"[-+.\w]+")  # a number, true, false or null (json.loads judges it)
_ESCAPE_PREFIX = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")  # an escape the text's end cuts
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB]")

# what may come next, by JSON's grammar: (the token's first character, what comes after it)
_VALUE = {"{": "key_or_end", "[": "value_or_end", '"': "after_value", "scalar": "after_value"}
_NEXT: dict[str, dict[str, str]] = {
    "value": _VALUE,
    "value_or_end": {**_VALUE, "]": "after_value"},
    "key": {'"': "colon"},
    "key_or_end": {'"': "colon", "}": "after_value"},
    "colon": {":": "value"},
    "after_value": {",": "after_comma", "}": "after_value", "]": "after_value"},
}
_SEPARATORS = {",": ", ", ":": ": "}  # json.dumps's


class JsonValueStream:
    """One JSON value (an object or array) re-written piece by piece: `push` the text as it
    decodes; `rest` is the text after the value once it has ended; `failed` once the text
    is not JSON (nothing more is re-written: the whole answer's parse then decides)."""

    def __init__(self) -> None:
        self._text = ""  # received and not yet re-written
        self._open: list[str] = []  # the brackets open, innermost last
        self._expect = "value"  # a key of _NEXT
        self._in_string = False
        self.rest: str | None = None
        self.failed = False

    def push(self, text: str) -> str:
        """The re-written form of what `text` completes."""
        if self.rest is not None:
            self.rest += text
            return ""
        if self.failed:
            return ""
        self._text += text
        out: list[str] = []
        i, s = 0, self._text
        while i < len(s):
            step = self._string(s, i, out) if self._in_string else self._token(s, i, out)
            if step is None:  # the text ends inside a token: wait for more
                break
            if step < 0:
                self.failed = True
                return "".join(out)
            i = step
            if not self._open and self._expect == "after_value":  # the value has ended
                self.rest = s[i:]
                break
        self._text = s[i:] if self.rest is None else ""
        return "".join(out)

    def _token(self, s: str, i: int, out: list[str]) -> int | None:
        """Where the token at `i` (outside strings) ends; -1: not JSON here."""
        c = s[i]
        if c in _WHITESPACE:
            return i + 1
        expect = self._expect
        if expect == "after_comma":
            expect = "key" if self._open[-1] == "{" else "value"
        kind = c if c in '{}[],:"' else "scalar"
        after = _NEXT[expect].get(kind)
        if after is None or (not self._open and kind not in "{["):  # objects, arrays only
            return -1
        end = i + 1
        if kind == "scalar":
            scalar = _SCALAR.match(s, i)
            if scalar is None:
                return -1
            if scalar.end() == len(s):  # a number may go on
                return None
            try:
                out.append(json.dumps(json.loads(scalar.group())))
            except ValueError:
                return -1
            end = scalar.end()
        elif c in "{[":
            self._open.append(c)
        elif c in "}]" and self._open.pop() != {"}": "{", "]": "["}[c]:
            return -1  # closes another bracket than the one open
        self._expect = after
        if kind == '"':
            self._in_string = True
        if kind != "scalar":
            out.append(_SEPARATORS.get(c, c))
        return end

    def _string(self, s: str, i: int, out: list[str]) -> int | None:
        """Where the part of a string at `i` ends: a run of characters, an escape, or the
        closing quote; -1: not JSON (a bad escape, a control character)."""
        run = _STRING_RUN.match(s, i)
        if run is not None:
            out.append(json.dumps(run.group(), ensure_ascii=False)[1:-1])
            return run.end()
        if s[i] == '"':
            self._in_string = False
            out.append('"')
            return i + 1
        if s[i] != "\\":
            return -1  # a control character, which JSON strings escape
        escape = _ESCAPE.match(s, i)
        if escape is None:
            return None if _ESCAPE_PREFIX.fullmatch(s, i) else -1
        end = escape.end()
        if _HIGH_SURROGATE.match(s, i):  # its pair, if one follows, makes one character
            if len(s) == end or (s[end] == "\\" and len(s) < end + 6):
                return None
            pair = _ESCAPE.match(s, end)
            if pair is not None and pair.group()[:2] == "\\u":
                end = pair.end()
        out.append(json.dumps(json.loads(f'"{s[i:end]}"'), ensure_ascii=False)[1:-1])
        return end
