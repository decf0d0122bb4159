"""The registry's limits and bookkeeping, without a server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.engine.protocol import Attribution
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict, NotFound, QuotaExceeded
from kvrt.runtime.graph.runs import Run
from kvrt.runtime.graph.store import StateStore
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentSpec,
    AgentWaiting,
    GraphSpec,
    ToolCallFinished,
    ToolCallStarted,
)

SPEC = GraphSpec(name="g", agents=[AgentSpec(name="a")])


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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def expire_idle(control: ControlPlane) -> list[Run]:
    """What the server's sweeper does (runtime/server/run_expiry.py), without the KV."""
    control.forget_expired()
    idle = control.idle_runs()
    for run in idle:
        control.expire(run)
    return idle


def idle_plane(timeout: float = 60.0, store: StateStore | None = None,
               **config: int) -> tuple[ControlPlane, Clock]:
    clock = Clock()
    return ControlPlane(ControlConfig(run_idle_timeout_s=timeout, **config), clock,
                        store=store), clock


def test_a_run_idle_past_the_timeout_expires_and_frees_its_slot_and_key() -> None:
    control, clock = idle_plane(60.0, max_runs_per_tenant=1)
    graph = control.create_graph(SPEC, "t")
    run = control.start_run(graph.id, "thread", "t")
    clock.now += 59.9
    assert expire_idle(control) == []
    with pytest.raises(QuotaExceeded):  # its one slot is taken
        control.start_run(graph.id, tenant="t")
    clock.now += 0.1
    assert expire_idle(control) == [run]
    assert run.status == "expired" and control.live_run_count("t") == 0
    # Readable, refusing events and calls with its own code.
    assert control.run(run.id, "t") is run
    assert [r.status for r in control.runs(tenant="t")] == ["expired"]
    for refused in (lambda: control.live_run(run.id, "t"),
                    lambda: run.apply(AgentDone(agent="a")),
                    lambda: control.agent_of(Attribution(run.id, "a"), "t")):
        with pytest.raises(Conflict) as conflict:
            refused()
        assert conflict.value.code == "run_expired"
    # The key starts a new run, in the slot the expired one freed.
    fresh = control.start_run(graph.id, "thread", "t")
    assert fresh is not run and fresh.status == "live"
    assert expire_idle(control) == []  # an expired run does not expire again


def test_events_calls_and_starts_by_key_are_activity() -> None:
    control, clock = idle_plane(60.0)
    graph = control.create_graph(SPEC)
    run = control.start_run(graph.id, "thread")
    clock.now += 50
    run.apply(ToolCallStarted(agent="a", tool="t", expected_duration_s=0))
    clock.now += 50
    run.apply(ToolCallFinished(agent="a", tool="t"))
    clock.now += 50
    assert control.start_run(graph.id, "thread") is run  # the client came back to it
    clock.now += 50
    call = run.submit_call(0, "req-1")
    clock.now += 1000  # a call in flight is activity, however long it takes
    assert expire_idle(control) == []
    call.ended()
    clock.now += 59
    assert expire_idle(control) == []
    clock.now += 1
    assert expire_idle(control) == [run]


def test_a_running_tool_or_wait_holds_the_run_until_its_predicted_end_then_the_timeout() -> None:
    control, clock = idle_plane(60.0)
    graph = control.create_graph(SPEC)
    tool, wait = control.start_run(graph.id), control.start_run(graph.id)
    tool.apply(ToolCallStarted(agent="a", tool="crawl", expected_duration_s=500))
    wait.apply(AgentWaiting(agent="a", reason="approval", expected_duration_s=300))
    clock.now += 359
    assert expire_idle(control) == []
    clock.now += 1
    assert expire_idle(control) == [wait]  # a person who never answered
    clock.now += 199
    assert expire_idle(control) == []
    clock.now += 1
    assert expire_idle(control) == [tool]  # a tool that never reported back


def test_an_expired_run_is_forgotten_after_the_timeout_again_or_when_deleted() -> None:
    control, clock = idle_plane(60.0)
    graph = control.create_graph(SPEC, "t")
    kept, deleted = control.start_run(graph.id, tenant="t"), control.start_run(graph.id, tenant="t")
    clock.now += 60
    assert expire_idle(control) == [kept, deleted]
    assert control.end_run(deleted.id, "t").status == "expired"
    with pytest.raises(NotFound):
        control.run(deleted.id, "t")
    clock.now += 59
    expire_idle(control)
    assert control.run(kept.id, "t").status == "expired"
    clock.now += 1
    expire_idle(control)
    with pytest.raises(NotFound):
        control.run(kept.id, "t")
    assert control.runs(tenant="t") == [] and graph.expired == set()


def test_a_graph_with_only_expired_runs_can_be_deleted() -> None:
    control, clock = idle_plane(60.0)
    graph = control.create_graph(SPEC)
    run = control.start_run(graph.id)
    clock.now += 60
    assert expire_idle(control) == [run]
    control.delete_graph(graph.id)
    with pytest.raises(NotFound):
        control.run(run.id)
    clock.now += 60
    assert expire_idle(control) == []  # its forgetting does not trip on the graph's absence


def test_a_timeout_of_zero_never_expires_a_run() -> None:
    control, clock = idle_plane(0.0)
    run = control.start_run(control.create_graph(SPEC).id)
    clock.now += 10**9
    assert expire_idle(control) == [] and run.status == "live"


def test_an_expired_run_is_ended_in_the_store_and_does_not_come_back(tmp_path: Path) -> None:
    control, clock = idle_plane(60.0, StateStore.open(str(tmp_path)))
    graph = control.create_graph(SPEC)
    expired, live = control.start_run(graph.id, "k"), control.start_run(graph.id)
    clock.now += 30
    live.apply(AgentDone(agent="a"))
    clock.now += 30
    assert expire_idle(control) == [expired]
    control.close()
    control, _ = idle_plane(60.0, StateStore.open(str(tmp_path)))
    assert [(r.id, r.status) for r in control.runs()] == [(live.id, "interrupted")]
    control.close()


def test_a_run_whose_expiry_cannot_be_written_stays_live(tmp_path: Path) -> None:
    store = StateStore.open(str(tmp_path))
    control, clock = idle_plane(60.0, store)
    run = control.start_run(control.create_graph(SPEC).id, "k")
    clock.now += 60
    store.close()  # every write fails from now on
    with pytest.raises(sqlite3.Error):
        control.expire(run)
    assert run.status == "live" and control.live_run_count() == 1
    assert control.keyed_run(run.graph_id, "k") is run
