"""Fixtures for the reliability suite: a fault proxy in front of the tiny server, killable server processes."""

from __future__ import annotations

import pytest

from tests.reliability.faulty_server import faulty_proxy
from tests.reliability.helpers import ServerProcess


@pytest.fixture
def proxy(tiny_server):
    """A fresh fault proxy in front of the session's tiny in-process server."""
    with faulty_proxy(tiny_server) as p:
        yield p


@pytest.fixture
def server_process(tiny_bert_dir, tmp_path):
    """Factory of killable ``python -m server_stub`` processes on the tiny model; all stopped at teardown."""
    made: list[ServerProcess] = []

    def make(*extra: str, env: dict[str, str] | None = None, port: int | None = None,
             options: dict | None = None) -> ServerProcess:
        sp = ServerProcess(tiny_bert_dir, *extra, env=env, port=port, options=options,
                           log_path=tmp_path / f"server{len(made)}.log")
        made.append(sp)
        return sp.start()

    yield make
    for sp in made:
        sp.kill()
