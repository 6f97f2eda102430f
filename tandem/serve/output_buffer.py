"""Stream-interval merging of one request's outputs (vLLM's and SGLang's stream interval).

A streamed request gets one message per `interval` generated tokens instead of one per
token: fewer gRPC writes when many streams run. The first token goes out at once (it is
what time-to-first-token measures), and so does the final message, with whatever was held
back merged in front of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class OutputBuffer(Generic[T]):
    """Holds a request's outputs until `interval` of them are waiting; `merge` joins
    consecutive outputs into one message (in order)."""

    def __init__(self, interval: int, merge: Callable[[Sequence[T]], T]) -> None:
        if interval < 1:
            raise ValueError(f"stream_interval={interval!r} is invalid: allowed >= 1")
        self.interval = interval
        self._merge = merge
        self._held: list[T] = []

    def add(self, output: T, *, flush: bool = False) -> T | None:
        """Holds `output`; returns the message to send now, if any: everything held, merged,
        when `flush` (the first token, the final message) or once `interval` are held."""
        self._held.append(output)
        if flush or len(self._held) >= self.interval:
            return self.take()
        return None

    def take(self) -> T | None:
        """Everything held, merged (None if nothing is): e.g. sent on its own before an
        error message, so what was generated before a failure is still delivered."""
        if not self._held:
            return None
        held, self._held = self._held, []
        return held[0] if len(held) == 1 else self._merge(held)

    def __len__(self) -> int:
        return len(self._held)
