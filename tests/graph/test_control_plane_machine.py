"""The control plane's quotas, listings and run expiry under random sequences of operations by
two tenants (a hypothesis state machine), held to a model kept by the test: per-tenant graph,
byte, run and run-agent quotas and the server-wide run limit refuse exactly when the model
says, a tenant never sees or touches the other's graphs and runs, idle runs expire and are
forgotten on time, and paging through every listing (two at a time) yields the model's items
in creation order."""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
import msgspec
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict, NotFound, QuotaExceeded
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec

TENANTS = ("a", "b")
IDLE_S = 10.0
MAX_GRAPHS, MAX_RUNS, MAX_LIVE = 3, 3, 4  # two tenants reach MAX_LIVE first
MAX_RUN_AGENTS = 20  # two runs of the 12-agent graph pass it
SPECS = {n: GraphSpec(name=f"g{n}", agents=[AgentSpec(name=f"x{i}") for i in range(n)])
         for n in (1, 3, 12)}
# Room for two of the largest declarations and a little: a third large one passes it.
BYTE_QUOTA = 2 * len(msgspec.json.encode(SPECS[12])) + 200
STRANGER = st.sampled_from([False, False, False, True])  # the other tenant tries it


@dataclass
class ModelRun:
    tenant: str
    graph: str
    key: str | None
    active_at: float  # the clock at its last activity (start, or a start by its key)
    expired_at: float | None = None


@dataclass
class ModelGraph:
    tenant: str
    size: int
    agents: int
    runs: list[str] = field(default_factory=list)


class ControlPlaneMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.control = ControlPlane(
            ControlConfig(max_graphs_per_tenant=MAX_GRAPHS, max_runs_per_tenant=MAX_RUNS,
                          max_live_runs=MAX_LIVE, max_graph_bytes_per_tenant=BYTE_QUOTA,
                          max_run_agents_per_tenant=MAX_RUN_AGENTS,
                          run_idle_timeout_s=IDLE_S),
            clock=lambda: self.now)
        self.graphs: dict[str, ModelGraph] = {}  # in creation order
        self.runs: dict[str, ModelRun] = {}  # live and expired (not forgotten), creation order

    def live(self, tenant: str | None = None) -> list[str]:
        return [i for i, r in self.runs.items() if r.expired_at is None
                and (tenant is None or r.tenant == tenant)]

    @rule(tenant=st.sampled_from(TENANTS), agents=st.sampled_from(sorted(SPECS)))
    def create_graph(self, tenant: str, agents: int) -> None:
        spec = SPECS[agents]
        size = len(msgspec.json.encode(spec))
        held = [g for g in self.graphs.values() if g.tenant == tenant]
        if len(held) >= MAX_GRAPHS:
            quota = "max_graphs_per_tenant"
        elif sum(g.size for g in held) + size > BYTE_QUOTA:
            quota = "max_graph_bytes_per_tenant"
        else:
            entry = self.control.create_graph(spec, tenant)
            self.graphs[entry.id] = ModelGraph(tenant, size, agents)
            return
        try:
            self.control.create_graph(spec, tenant)
        except QuotaExceeded as exc:
            assert exc.quota == quota
        else:
            raise AssertionError(f"a graph past {quota} was declared")

    @rule(pick=st.integers(0, 50), stranger=STRANGER)
    def delete_graph(self, pick: int, stranger: bool) -> None:
        if not self.graphs:
            return
        graph_id = list(self.graphs)[pick % len(self.graphs)]
        graph = self.graphs[graph_id]
        tenant = _other(graph.tenant) if stranger else graph.tenant
        if stranger:
            _raises(NotFound, self.control.delete_graph, graph_id, tenant)
            return
        if any(self.runs[r].expired_at is None for r in graph.runs):
            _raises(Conflict, self.control.delete_graph, graph_id, tenant)
            return
        self.control.delete_graph(graph_id, tenant)
        for run_id in graph.runs:  # expired runs go with their graph
            del self.runs[run_id]
        del self.graphs[graph_id]

    @rule(pick=st.integers(0, 50), key=st.sampled_from([None, "k1", "k2"]), stranger=STRANGER)
    def start_run(self, pick: int, key: str | None, stranger: bool) -> None:
        if not self.graphs:
            return
        graph_id = list(self.graphs)[pick % len(self.graphs)]
        graph = self.graphs[graph_id]
        tenant = _other(graph.tenant) if stranger else graph.tenant
        if stranger:
            _raises(NotFound, self.control.start_run, graph_id, key, tenant)
            return
        keyed = [r for r in graph.runs if key is not None and self.runs[r].key == key
                 and self.runs[r].expired_at is None]
        if keyed:
            assert self.control.start_run(graph_id, key, tenant).id == keyed[0]
            self.runs[keyed[0]].active_at = self.now  # a start by its key is activity
        elif len(self.live(tenant)) >= MAX_RUNS:
            with_quota = _raises(QuotaExceeded, self.control.start_run, graph_id, key, tenant)
            assert with_quota.quota == "max_runs_per_tenant"
        elif sum(self.graphs[self.runs[r].graph].agents
                 for r in self.live(tenant)) + graph.agents > MAX_RUN_AGENTS:
            with_quota = _raises(QuotaExceeded, self.control.start_run, graph_id, key, tenant)
            assert with_quota.quota == "max_run_agents_per_tenant"
        elif len(self.live()) >= MAX_LIVE:
            conflict = _raises(Conflict, self.control.start_run, graph_id, key, tenant)
            assert conflict.code == "too_many_runs"
        else:
            run = self.control.start_run(graph_id, key, tenant)
            self.runs[run.id] = ModelRun(tenant, graph_id, key, self.now)
            graph.runs.append(run.id)

    @rule(pick=st.integers(0, 50), stranger=STRANGER)
    def end_run(self, pick: int, stranger: bool) -> None:
        if not self.runs:
            return
        run_id = list(self.runs)[pick % len(self.runs)]
        run = self.runs[run_id]
        tenant = _other(run.tenant) if stranger else run.tenant
        if stranger:
            _raises(NotFound, self.control.end_run, run_id, tenant)
            return
        self.control.end_run(run_id, tenant)
        del self.runs[run_id]
        self.graphs[run.graph].runs.remove(run_id)

    @rule(seconds=st.sampled_from([0.5, 3.0, 6.0, 10.5]))
    def time_passes(self, seconds: float) -> None:
        """The clock moves, then the server's sweeper runs: forget, then expire."""
        self.now += seconds
        self.control.forget_expired()
        for run in self.control.idle_runs():
            self.control.expire(run)
        for run_id, run in list(self.runs.items()):
            if run.expired_at is not None and self.now - run.expired_at >= IDLE_S:
                del self.runs[run_id]
                self.graphs[run.graph].runs.remove(run_id)
        for run in self.runs.values():
            if run.expired_at is None and self.now - run.active_at >= IDLE_S:
                run.expired_at = self.now

    @invariant()
    def listings_page_through_the_model(self) -> None:
        for tenant in TENANTS:
            graphs = _all_pages(lambda after, t=tenant: self.control.graph_page(t, 2, after))
            assert graphs == [i for i, g in self.graphs.items() if g.tenant == tenant]
            runs = _all_pages(lambda after, t=tenant: self.control.run_page(t, 2, after))
            assert runs == [i for i, r in self.runs.items() if r.tenant == tenant]
            assert self.control.live_run_count(tenant) == len(self.live(tenant))

    @invariant()
    def each_run_reads_as_the_model_says_to_its_tenant_only(self) -> None:
        for run_id, model in self.runs.items():
            run = self.control.run(run_id, model.tenant)
            assert run.status == ("live" if model.expired_at is None else "expired")
            _raises(NotFound, self.control.run, run_id, _other(model.tenant))
            if model.expired_at is not None:
                conflict = _raises(Conflict, self.control.live_run, run_id, model.tenant)
                assert conflict.code == "run_expired"


def _other(tenant: str) -> str:
    return next(t for t in TENANTS if t != tenant)


def _all_pages(page) -> list[str]:
    ids: list[str] = []
    while True:
        got = page(ids[-1] if ids else None)
        ids += [item.id for item in got.items]
        if not got.has_more:
            return ids


def _raises(kind, fn, *args):
    try:
        fn(*args)
    except kind as exc:
        return exc
    raise AssertionError(f"{fn.__name__}{args} did not raise {kind.__name__}")


ControlPlaneMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                                 deadline=None)
test_control_plane_machine = ControlPlaneMachine.TestCase
