"""Fixtures for serving tests: the byte tokenizer and fake-engine servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from model.tokenizer import Tokenizer
from serve.config import ServeConfig
from serve.fake_engine import FakeEngine
from serve.server import BackgroundServer, TandemServer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.byte()


@pytest.fixture
def make_fake_server(tokenizer) -> Iterator[Callable[..., BackgroundServer]]:
    """Starts fake-engine servers on free ports; stops them at teardown."""
    started: list[BackgroundServer] = []

    def make(
        *,
        cfg: ServeConfig | None = None,
        metrics: bool = False,
        token: str | None = None,
        **engine_kw,
    ) -> BackgroundServer:
        cfg = cfg or ServeConfig(max_slots=4, max_queue=16)
        engine_kw.setdefault("max_slots", cfg.max_slots)
        engine = FakeEngine(tokenizer, **engine_kw)
        server = TandemServer(engine, cfg, port=0, metrics_port=0 if metrics else None, token=token)
        bg = BackgroundServer(server).start()
        started.append(bg)
        return bg

    yield make
    for bg in started:
        bg.stop(grace=2.0)
