"""Implicit runs in the control plane, without a server: one run per (tenant, session key), tool
calls read off the conversation (started by a reply, finished or abandoned by the next
request), durations learned per tool across the tenant's sessions, expiry, and the state
store left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import QuotaExceeded
from kvrt.runtime.graph.implicit import IMPLICIT_AGENT, MAX_IMPLICIT_TOOLS, OTHER_TOOL
from kvrt.runtime.graph.store import StateStore
from tests.graph.test_control_plane import Clock, expire_idle

AGENT = IMPLICIT_AGENT


def plane(timeout: float = 60.0, store: StateStore | None = None,
          **config: int) -> tuple[ControlPlane, Clock]:
    clock = Clock()
    return ControlPlane(ControlConfig(run_idle_timeout_s=timeout, **config), clock,
                        store=store), clock


def estimate(run, tool: str) -> tuple[int, float | None]:
    [found] = [e for (agent, name), e in run.costs.estimates.items()
               if (agent, name) == (AGENT, tool)]
    return found.observations, found.seconds


def test_one_run_per_key_and_tenant_on_one_implicit_graph_per_tenant() -> None:
    control, _ = plane()
    first = control.implicit_run("conv-1", "t")
    assert control.implicit_run("conv-1", "t") is first
    other_key = control.implicit_run("conv-2", "t")
    other_tenant = control.implicit_run("conv-1", "u")
    assert len({first.id, other_key.id, other_tenant.id}) == 3
    assert first.implicit and first.key == "conv-1" and first.tenant == "t"
    assert first.graph_id == other_key.graph_id != other_tenant.graph_id
    [graph] = control.graphs("t")
    assert graph.implicit and [a.name for a in graph.graph.agents] == [AGENT]
    assert graph.declared_bytes == 0  # counts against no byte quota
    assert {r.id for r in control.runs(tenant="u")} == {other_tenant.id}


def test_a_reply_s_calls_are_tool_calls_until_the_next_request_answers_them() -> None:
    control, clock = plane()
    run = control.implicit_run("conv", "t")
    run.submit_call(0, "req-1").ended()
    started = run.reply_called([("call_a", "search"), ("call_b", "fetch")], {"search", "fetch"})
    assert [(e.kind, e.predicted_s) for e in started] == [("tool_call.started", 0.0)] * 2
    assert run.agent_state(AGENT) == "tool_call"
    assert set(run.agents[0].tools) == {"search", "fetch"}
    clock.now += 2.5
    ended = run.request_came({"call_a", "call_b"})
    assert [e.kind for e in ended] == ["tool_call.finished"] * 2
    assert run.agent_state(AGENT) == "idle"
    assert estimate(run, "search") == (1, 2.5) and estimate(run, "fetch") == (1, 2.5)
    # A retried request with the same results settles nothing more.
    assert run.request_came({"call_a", "call_b"}) == []
    assert estimate(run, "search") == (1, 2.5)


def test_the_learned_duration_is_what_the_next_call_of_the_tool_predicts() -> None:
    control, clock = plane()
    first = control.implicit_run("conv-1", "t")
    first.reply_called([("call_1", "search")], {"search"})
    clock.now += 4.0
    first.request_came({"call_1"})
    # Another session of the tenant: the same implicit graph, so the same estimate.
    second = control.implicit_run("conv-2", "t")
    second.submit_call(0, "req").ended()  # the call whose reply asks for the tool
    [event] = second.reply_called([("call_2", "search")], {"search"})
    assert event.predicted_s == 4.0
    assert second.next_use(0, second.criticality()) == pytest.approx(4.0)
    clock.now += 1.0  # what is left of the agent's work: the tool's 3 s
    assert second.costs.work(second.graph.agents[0], second.agents[0],
                             clock.now) == pytest.approx(3.0)
    # Another tenant has learned nothing.
    [elsewhere] = control.implicit_run("conv-1", "u").reply_called([("c", "search")], {"search"})
    assert elsewhere.predicted_s == 0.0


def test_a_request_without_the_results_ends_the_calls_and_learns_nothing() -> None:
    control, clock = plane()
    run = control.implicit_run("conv", "t")
    run.reply_called([("call_1", "search"), ("call_2", "search")], {"search"})
    assert len(run.agents[0].tools["search"]) == 2  # parallel calls of one tool
    clock.now += 30.0
    ended = run.request_came({"call_2"})  # one answered, the other dropped
    assert [e.kind for e in ended] == ["tool_call.finished"] * 2
    assert run.agent_state(AGENT) == "idle" and run.open_calls == {}
    assert estimate(run, "search") == (1, 30.0)
    run.reply_called([("call_3", "fetch")], {"fetch"})
    clock.now += 99.0
    assert [e.kind for e in run.request_came(set())] == ["tool_call.finished"]
    assert run.agent_state(AGENT) == "idle"
    assert all(tool != "fetch" for (_, tool), _ in run.costs.estimates.items())


def test_calls_of_tools_the_request_did_not_offer_are_not_tool_calls() -> None:
    control, _ = plane()
    run = control.implicit_run("conv", "t")
    assert run.reply_called([("call_1", "rm_rf")], {"search"}) == []
    assert run.agent_state(AGENT) == "idle" and run.open_calls == {}


def test_the_tools_an_implicit_graph_learns_are_bounded() -> None:
    control, clock = plane()
    run = control.implicit_run("conv", "t")
    names = [f"tool_{i}" for i in range(MAX_IMPLICIT_TOOLS + 3)]
    for i, name in enumerate(names):
        run.reply_called([(f"call_{i}", name)], {name})
        clock.now += 1.0
        run.request_came({f"call_{i}"})
    learned = {tool for (_, tool), _ in run.costs.estimates.items()}
    assert len(learned) == MAX_IMPLICIT_TOOLS + 1
    assert OTHER_TOOL in learned and names[-1] not in learned
    assert estimate(run, OTHER_TOOL) == (3, 1.0)


def test_an_idle_implicit_run_expires_and_its_key_starts_a_new_one() -> None:
    control, clock = plane(60.0, max_runs_per_tenant=1)
    run = control.implicit_run("conv", "t")
    run.reply_called([("call_1", "search")], {"search"})
    clock.now += 61.0
    assert expire_idle(control) == [run] and run.status == "expired"
    again = control.implicit_run("conv", "t")  # its slot in the quota is free again
    assert again is not run and again.status == "live" and again.implicit


def test_a_full_quota_refuses_a_new_session_as_it_refuses_a_run() -> None:
    control, _ = plane(max_runs_per_tenant=1)
    control.implicit_run("conv-1", "t")
    with pytest.raises(QuotaExceeded):
        control.implicit_run("conv-2", "t")


def test_implicit_runs_are_not_written_to_the_state_store(tmp_path: Path) -> None:
    control, clock = plane(60.0, StateStore.open(str(tmp_path)))
    run = control.implicit_run("conv", "t")
    run.submit_call(0, "req").ended()
    run.reply_called([("call_1", "search")], {"search"})
    clock.now += 1.0
    run.request_came({"call_1"})
    control.end_run(run.id, "t")
    control.implicit_run("conv-2", "t")
    control.close()
    restarted, _ = plane(60.0, StateStore.open(str(tmp_path)))
    assert restarted.graphs() == [] and restarted.runs() == []
    restarted.close()


def test_deleting_the_implicit_graph_makes_a_new_one_for_the_next_session() -> None:
    control, _ = plane()
    run = control.implicit_run("conv", "t")
    control.end_run(run.id, "t")
    [graph] = control.graphs("t")
    control.delete_graph(graph.id, "t")
    again = control.implicit_run("conv", "t")
    assert again.graph_id != graph.id and [g.id for g in control.graphs("t")] == [again.graph_id]


def test_an_ended_or_expired_run_is_no_longer_live() -> None:
    control, clock = plane(60.0)
    ended, idle = control.implicit_run("a", "t"), control.implicit_run("b", "t")
    assert control.is_live(ended) and control.is_live(idle)
    control.end_run(ended.id, "t")
    clock.now += 61.0
    expire_idle(control)
    assert not control.is_live(ended) and not control.is_live(idle)
