"""Streaming text for one request: UTF-8-safe detokenization plus stop-string handling.

Two failure modes of other servers this module exists to avoid:
  * a stop string that spans several tokens, or sits inside one token, is still found,
    because matching runs on the decoded text, not on token boundaries;
  * no part of a stop string is ever sent: text that could be the start of a stop string
    is held back until the next tokens show whether it is one (partial-stop holdback).
Broken multi-byte characters never reach the client because the incremental detokenizer
(model.tokenizer.IncrementalDetokenizer) only releases completed characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Turns token ids into text deltas, stopping before the first stop string.

    `push` returns (delta, matched): `matched` is the stop string that ended the text (the
    delta then holds only what precedes it) or None. After a match further pushes are a
    bug. `finish` releases whatever was held back when generation ends for another reason.
    With `min_tokens` no stop string ends the text before token min_tokens + 1, which
    may complete one begun earlier; one that ended before never does (vLLM v1's
    detokenizer: min_tokens holds back the stop strings as it does the stop ids).
    """

    def __init__(
        self, detokenizer: Detokenizer, stop: Sequence[str] = (), min_tokens: int = 0
    ) -> None:
        self._detok = detokenizer
        self._stops = tuple(stop)
        self._unmatched = min_tokens  # tokens still to push before a stop may match
        self._pending = ""  # decoded text not yet sent (may start a stop string)
        self.text = ""  # everything sent so far
        self.stopped: str | None = None

    def push(self, token_id: int) -> tuple[str, str | None]:
        if self.stopped is not None:
            raise RuntimeError("push after a stop string matched")
        self._unmatched -= 1
        return self._feed(self._detok.push(token_id), final=False)

    def finish(self) -> str:
        """Flushes the detokenizer and sends any held-back text (no stop can follow)."""
        if self.stopped is not None:
            return ""
        delta, _ = self._feed(self._detok.flush(), final=True)
        return delta

    def _feed(self, new: str, *, final: bool) -> tuple[str, str | None]:
        self._pending += new
        if self._stops and self._pending and self._unmatched < 0:
            hit, hit_stop = -1, None
            for s in self._stops:
                # only a match ending in the new text: one that ended earlier (within the
                # first min_tokens tokens, held back as the start of a longer stop) does
                # not count, as in vLLM's `check_stop_strings`
                i = self._pending.find(s, max(0, len(self._pending) - len(new) - len(s) + 1))
                if i >= 0 and (hit < 0 or i < hit):
                    hit, hit_stop = i, s
            if hit_stop is not None:
                delta = self._pending[:hit]
                self._pending = ""
                self.text += delta
                self.stopped = hit_stop
                return delta, hit_stop
        keep = 0 if final else holdback(self._pending, self._stops)
        cut = len(self._pending) - keep
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += delta
        return delta, None
