"""examples/three_agent_pipeline.py runs end to end against the daemon."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from tests.server.live_server import LiveServer

EXAMPLE = Path(__file__).parents[2] / "examples" / "three_agent_pipeline.py"


def test_three_agent_pipeline(server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("three_agent_pipeline", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    state = asyncio.run(example.main(server.url, max_tokens=6))

    assert [a.name for a in state.agents] == ["planner", "searcher", "writer"]
    assert all(a.state == "done" and a.generated_tokens > 0 for a in state.agents)
    [search] = [t for t in state.tools if t.tool == "web_search"]
    assert search.agent == "searcher" and search.observations == 1
    out = capsys.readouterr().out
    for line in ("planner> ", "searcher> ", "writer> ", "tokens, priority"):
        assert line in out
