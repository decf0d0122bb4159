"""The registry's limits and bookkeeping, without a server."""

from __future__ import annotations

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict, NotFound
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec


def test_live_runs_are_limited_and_ending_one_makes_room() -> None:
    control = ControlPlane(ControlConfig(max_live_runs=2))
    graph = control.create_graph(GraphSpec(name="g", agents=[AgentSpec(name="a")]))
    first = control.start_run(graph.id)
    control.start_run(graph.id)
    with pytest.raises(Conflict) as refused:
        control.start_run(graph.id)
    assert refused.value.code == "too_many_runs"
    control.end_run(first.id)
    assert len(control.runs(graph.id)) == 1
    control.start_run(graph.id)
    with pytest.raises(NotFound):
        control.run(first.id)
    assert graph.runs == {r.id for r in control.runs()}
