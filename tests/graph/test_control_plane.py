"""The registry's limits and bookkeeping, without a server."""

from __future__ import annotations

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict, NotFound, QuotaExceeded
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


def test_one_tenant_cannot_take_the_run_slots_or_the_graph_store_of_another() -> None:
    control = ControlPlane(ControlConfig(max_live_runs=10, max_runs_per_tenant=2,
                                         max_graphs_per_tenant=2))
    spec = GraphSpec(name="g", agents=[AgentSpec(name="a")])
    mine = [control.create_graph(spec, tenant="abuser") for _ in range(2)]
    with pytest.raises(QuotaExceeded) as graphs:
        control.create_graph(spec, tenant="abuser")
    assert graphs.value.quota == "max_graphs_per_tenant"
    runs = [control.start_run(mine[0].id, key="k", tenant="abuser"),
            control.start_run(mine[1].id, tenant="abuser")]
    with pytest.raises(QuotaExceeded) as more:
        control.start_run(mine[0].id, tenant="abuser")
    assert more.value.quota == "max_runs_per_tenant" and "2 live runs" in str(more.value)
    # A keyed start of a live run is no new run: it is found even at the quota.
    assert control.start_run(mine[0].id, key="k", tenant="abuser") is runs[0]
    # The other tenant is untouched by the first one's quota.
    theirs = control.create_graph(spec, tenant="polite")
    assert control.start_run(theirs.id, tenant="polite").tenant == "polite"
    # Ending a run (or deleting a graph) gives the tenant its room back.
    control.end_run(runs[0].id, tenant="abuser")
    assert control.start_run(mine[0].id, tenant="abuser").tenant == "abuser"
    control.end_run(runs[1].id, tenant="abuser")
    control.delete_graph(mine[1].id, tenant="abuser")
    assert control.create_graph(spec, tenant="abuser").tenant == "abuser"
