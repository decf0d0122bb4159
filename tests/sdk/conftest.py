"""Fixtures of the SDK tests: a real daemon on loopback (the tiny model, once per module) that
the SDK talks to over HTTP, as an application would."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kvrt.runtime.model.tiny import init_tiny
from tests.server.live_server import SMALL_ENGINE, LiveServer, live_server

# Room for a three-agent conversation's prompts in the tiny model's 512-token vocabulary.
SDK_ENGINE = replace(SMALL_ENGINE, max_model_len=1024)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=0)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, SDK_ENGINE)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
