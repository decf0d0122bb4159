"""The registry's limits and bookkeeping, without a server."""

from __future__ import annotations

import gc
import sqlite3
from pathlib import Path

import pytest

from kvrt.runtime.config import DEFAULT_TENANT, ControlConfig, ServeConfig
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


TINY = GraphSpec(name="g", agents=[AgentSpec(name="a")])
# TINY as the byte quota counts it: compact JSON with every field, defaults too.
TINY_JSON = ('{"name":"g","agents":[{"name":"a","system":null,"tools":{},'
             '"expected_output_tokens":null,"importance":1.0}],"edges":[],"reuse":"exact"}')


def ids(page) -> list[str]:
    return [item.id for item in page.items]


def test_graphs_page_in_creation_order_while_graphs_come_and_go() -> None:
    control = ControlPlane(ControlConfig())
    mine = []
    for _ in range(5):  # another tenant's graphs in between are never shown
        mine.append(control.create_graph(TINY, tenant="a").id)
        control.create_graph(TINY, tenant="b")
    first = control.graph_page("a", 2)
    assert (ids(first), first.has_more) == (mine[:2], True)
    # The page's last graph is deleted, and one is created, before the next page is asked for:
    # the deleted id still marks the place, the new graph comes at the end.
    control.delete_graph(mine[1], tenant="a")
    mine.append(control.create_graph(TINY, tenant="a").id)
    second = control.graph_page("a", 2, after=mine[1])
    assert (ids(second), second.has_more) == (mine[2:4], True)
    last = control.graph_page("a", 2, after=mine[3])
    assert (ids(last), last.has_more) == (mine[4:], False)
    assert control.graph_page("a", 2, after=mine[5]).items == []
    assert [e.id for e in control.graphs("a")] == [mine[0], *mine[2:]]


def test_a_page_of_graphs_stops_before_a_mebibyte_of_declarations() -> None:
    control = ControlPlane(ControlConfig())
    # Each some 0.4 MiB declared: two fit in a page, three do not.
    wide = GraphSpec(name="g", agents=[AgentSpec(name="a", system="x" * 400 * 1024)])
    made = [control.create_graph(wide).id for _ in range(5)]
    assert all(400 * 1024 < g.declared_bytes < 512 * 1024 for g in control.graphs())
    first = control.graph_page(DEFAULT_TENANT, 20)
    assert (ids(first), first.has_more) == (made[:2], True)
    second = control.graph_page(DEFAULT_TENANT, 20, after=made[1])
    assert (ids(second), second.has_more) == (made[2:4], True)
    # One graph larger than the whole page still comes, alone.
    huge = control.create_graph(GraphSpec(name="g", agents=[
        AgentSpec(name="a", system="x" * 2 * 1024**2)])).id
    assert ids(control.graph_page(DEFAULT_TENANT, 20, after=made[3])) == [made[4]]
    last = control.graph_page(DEFAULT_TENANT, 20, after=made[4])
    assert (ids(last), last.has_more) == ([huge], False)


def test_runs_page_by_tenant_graph_and_key() -> None:
    control = ControlPlane(ControlConfig())
    one, two = (control.create_graph(TINY, tenant="a") for _ in range(2))
    runs = [control.start_run(graph.id, key=key, tenant="a").id
            for graph, key in ((one, "k"), (two, "k"), (one, None), (two, None), (one, "j"))]
    control.start_run(control.create_graph(TINY, tenant="b").id, key="k", tenant="b")
    assert ids(control.run_page("a", 10)) == runs
    of_one = control.run_page("a", 2, graph_id=one.id)
    assert (ids(of_one), of_one.has_more) == ([runs[0], runs[2]], True)
    rest = control.run_page("a", 2, after=runs[2], graph_id=one.id)
    assert (ids(rest), rest.has_more) == ([runs[4]], False)
    assert ids(control.run_page("a", 10, key="k")) == runs[:2]
    assert ids(control.run_page("a", 10, key="k", graph_id=two.id)) == [runs[1]]
    assert ids(control.run_page("a", 1, after=runs[0], key="k")) == [runs[1]]
    control.end_run(runs[2], tenant="a")
    assert ids(control.run_page("a", 10, graph_id=one.id)) == [runs[0], runs[4]]
    assert control.run_page("b", 10, graph_id=one.id).items == []  # not theirs


def test_ids_sort_in_the_order_they_were_made() -> None:
    control = ControlPlane(ControlConfig())
    made = [control.create_graph(TINY).id for _ in range(50)]
    assert sorted(made) == made and len(set(made)) == 50


def test_declared_bytes_are_a_tenant_quota_freed_by_deletes() -> None:
    size = len(TINY_JSON)
    control = ControlPlane(ControlConfig(max_graph_bytes_per_tenant=3 * size))
    held = [control.create_graph(TINY, tenant="a") for _ in range(3)]
    assert [g.declared_bytes for g in held] == [size] * 3
    with pytest.raises(QuotaExceeded) as full:
        control.create_graph(TINY, tenant="a")
    assert (full.value.quota, full.value.too_large) == ("max_graph_bytes_per_tenant", False)
    assert f"hold {3 * size} bytes" in str(full.value)
    assert control.create_graph(TINY, tenant="b").tenant == "b"  # another tenant's room
    control.delete_graph(held[0].id, tenant="a")
    assert control.create_graph(TINY, tenant="a").declared_bytes == size
    # One graph larger than the whole quota can never fit: too large, not "full".
    big = GraphSpec(name="g", agents=[AgentSpec(name="a", system="x" * 3 * size)])
    with pytest.raises(QuotaExceeded) as alone:
        control.create_graph(big, tenant="c")
    assert alone.value.too_large and control.graphs("c") == []


def test_graphs_brought_back_from_the_state_dir_count_against_the_quota(tmp_path) -> None:
    config = ServeConfig(state_dir=str(tmp_path), control=ControlConfig(
        max_graph_bytes_per_tenant=2 * len(TINY_JSON)))
    control = ControlPlane.open(config)
    kept = [control.create_graph(TINY, tenant="a").id for _ in range(2)]
    control.close()
    control = ControlPlane.open(config)
    assert [(g.id, g.declared_bytes) for g in control.graphs("a")] == [
        (graph_id, len(TINY_JSON)) for graph_id in kept]
    with pytest.raises(QuotaExceeded):
        control.create_graph(TINY, tenant="a")
    control.close()


def test_a_load_freezes_what_it_made_and_leaves_the_collector_on(tmp_path) -> None:
    config = ServeConfig(state_dir=str(tmp_path))
    first = ControlPlane.open(config)
    first.create_graph(TINY)
    first.close()
    gc.unfreeze()
    try:
        control = ControlPlane.open(config)
        assert gc.isenabled() and gc.get_freeze_count() > 0
        [entry] = control.graphs()
        assert all(tracked is not entry for tracked in gc.get_objects())  # frozen: not walked
        control.close()
        assert gc.get_freeze_count() == 0  # back to the collector, for the exit's
    finally:
        gc.unfreeze()


def agents(count: int) -> GraphSpec:
    return GraphSpec(name=f"g{count}", agents=[AgentSpec(name=f"a{i}") for i in range(count)])


def test_the_agents_of_a_tenants_live_runs_are_a_quota_refused_exactly_past_it() -> None:
    control = ControlPlane(ControlConfig(max_run_agents_per_tenant=10))
    four, two = (control.create_graph(agents(n), tenant="a") for n in (4, 2))
    first = control.start_run(four.id, key="k", tenant="a")
    control.start_run(four.id, tenant="a")
    with pytest.raises(QuotaExceeded) as full:  # 8 + 4 > 10
        control.start_run(four.id, tenant="a")
    assert (full.value.quota, full.value.too_large) == ("max_run_agents_per_tenant", False)
    assert "have 8 agents together" in str(full.value)
    control.start_run(two.id, tenant="a")  # 8 + 2 = 10: exactly the quota
    assert control.live_run_agents("a") == 10
    with pytest.raises(QuotaExceeded):
        control.start_run(two.id, tenant="a")
    # A keyed start of a live run is no new run; another tenant has its own room.
    assert control.start_run(four.id, key="k", tenant="a") is first
    theirs = control.create_graph(agents(4), tenant="b")
    assert control.start_run(theirs.id, tenant="b").tenant == "b"
    # Ending a run gives its agents back.
    control.end_run(first.id, tenant="a")
    assert control.live_run_agents("a") == 6
    control.start_run(four.id, tenant="a")


def test_an_expired_run_frees_its_agents_from_the_quota() -> None:
    control, clock = idle_plane(60.0, max_run_agents_per_tenant=4)
    graph = control.create_graph(agents(4))
    control.start_run(graph.id)
    with pytest.raises(QuotaExceeded):
        control.start_run(graph.id)
    clock.now += 61
    assert len(expire_idle(control)) == 1
    assert control.live_run_agents(DEFAULT_TENANT) == 0
    control.start_run(graph.id)


def test_a_graph_with_more_agents_than_the_quota_is_too_large_to_run() -> None:
    control = ControlPlane(ControlConfig(max_run_agents_per_tenant=3))
    graph = control.create_graph(agents(4))  # declaring it is not running it
    with pytest.raises(QuotaExceeded) as alone:
        control.start_run(graph.id)
    assert (alone.value.quota, alone.value.too_large) == ("max_run_agents_per_tenant", True)
    assert control.runs(graph.id) == []


def test_interrupted_runs_share_one_idle_activity_and_leave_the_quota(tmp_path) -> None:
    config = ServeConfig(state_dir=str(tmp_path),
                         control=ControlConfig(max_run_agents_per_tenant=6))
    control = ControlPlane.open(config)
    graph = control.create_graph(agents(3))
    left = [control.start_run(graph.id).id for _ in range(2)]
    control.close()
    control = ControlPlane.open(config)
    for run_id in left:
        run = control.run(run_id)
        assert run.status == "interrupted"
        assert [a.state for a in run.agents] == ["idle"] * 3
        assert len({id(activity) for activity in run.agents}) == 1  # one shared activity
        with pytest.raises(Conflict) as refused:
            run.apply(AgentDone(agent="a0"))
        assert refused.value.code == "run_interrupted"
    # They hold none of the quota: two live runs fit beside them, a third does not.
    assert control.live_run_agents(DEFAULT_TENANT) == 0
    fresh = [control.start_run(graph.id) for _ in range(2)]
    assert len({id(activity) for run in fresh for activity in run.agents}) == 6
    with pytest.raises(QuotaExceeded):
        control.start_run(graph.id)
    control.close()
