"""Outputs from the orchestrator's thread to the asyncio event loop of an API layer."""

from __future__ import annotations

import asyncio
import threading

from tandem.serve.orchestrator import Output


class Handoff:
    """Orchestrator thread -> event loop: the outputs of one step for many streams cross
    with ONE wake-up (a parked list drained by one scheduled callback); a wake-up per
    token and stream would cost more than the token. Each output reaches its request's
    queue as (choice index, Output). Shared by the gRPC and HTTP layers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[tuple[asyncio.Queue, tuple[int, Output]]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, index: int, out: Output) -> None:
        with self._lock:
            self._pending.append((queue, (index, out)))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for queue, item in pending:
            queue.put_nowait(item)
