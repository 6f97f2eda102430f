"""Fixtures for serving tests: the byte tokenizer and fake-engine servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest

from tandem.model.tokenizer import Tokenizer
from tandem.serve.config import ServeConfig
from tandem.serve.fake_engine import FakeEngine
from tandem.serve.server import BackgroundServer, TandemServer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.byte()


@pytest.fixture
def make_fake_server(tokenizer, tmp_path) -> Iterator[Callable[..., BackgroundServer]]:
    """Starts fake-engine servers on free ports (with `tok`, another tokenizer than the
    byte one); stops them at teardown."""
    started: list[BackgroundServer] = []

    def make(
        *,
        cfg: ServeConfig | None = None,
        metrics: bool = False,
        token: str | None = None,
        tok: Tokenizer | None = None,
        **engine_kw,
    ) -> BackgroundServer:
        cfg = cfg or ServeConfig(max_seqs=4, max_queue=16, max_prompt_len=64)
        token_file = ""
        if token is not None:
            token_file = str(tmp_path / f"token-{len(started)}")
            (tmp_path / f"token-{len(started)}").write_text(token)
        cfg = dataclasses.replace(
            cfg, port=0, metrics_port=0 if metrics else None, token_file=token_file
        )
        engine = FakeEngine(tok or tokenizer, cfg, **engine_kw)
        server = TandemServer(engine, cfg)
        bg = BackgroundServer(server).start()
        started.append(bg)
        return bg

    yield make
    for bg in started:
        bg.stop(grace=2.0)
