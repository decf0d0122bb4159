"""The registry of declared graphs and their runs. Lives on the server's event loop (no locks):
each method runs to its end without yielding, which is what makes `start_run` by key atomic.

Everything belongs to a tenant (runtime/server/auth.py). Every lookup takes the caller's
tenant, and another tenant's graph or run is NotFound, exactly as one that does not exist: a
caller cannot learn that another's id exists. Listings show the caller's only.

With a state store (`--state-dir`, runtime/graph/store.py) graphs and runs are written as they
are declared, started and ended, before the change is made in memory (a failed write changes
nothing). Opened on a store, the control plane brings back its graphs (same ids and tenants)
and, as "interrupted", the runs that were live when the last daemon stopped: they can be read,
listed and ended, but take no events and no calls (Conflict `run_interrupted`), do not count
against `max_live_runs` nor the tenant's quotas of live runs and their agents (nothing changes
them, so their agents share one idle activity, a reference each: Run), and no longer hold
their key (its next start begins a new run).
What the runs of a graph taught (runtime/graph/learning.py) is written at each episode's fold
and brought back too; an episode in progress when the daemon stopped is lost.

A live run idle past `run_idle_timeout_s` (Run.idle_deadline, `idle_runs`) expires (`expire`,
called by the server's sweeper about once a second, which then releases the run's KV): it is
ended as a DELETE ends it (written as ended to the store, so a restart does not bring it
back), frees its slot in the quotas and its key, and stays readable as "expired" (Conflict
`run_expired` for events and calls) for as long again, or until deleted, before it is
forgotten (`forget_expired`).

A call with a session key and no run belongs to the key's implicit run (`implicit_run`,
runtime/graph/implicit.py), a run of the tenant's implicit graph, both made on first sight and
kept in memory only (never written to the store). The implicit graph counts against no graph
quota (the daemon made it); its runs count against the run quotas as any run does.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import msgspec

from kvrt.runtime.config import DEFAULT_TENANT, ControlConfig, ServeConfig
from kvrt.runtime.engine.protocol import Attribution
from kvrt.runtime.graph.critical_path import Criticality, critical_path
from kvrt.runtime.graph.declaration import AgentGraph, declare_graph
from kvrt.runtime.graph.errors import Conflict, GraphError, NotFound, QuotaExceeded
from kvrt.runtime.graph.implicit import IMPLICIT_GRAPH, ImplicitRun
from kvrt.runtime.graph.learning import LearnedGraph
from kvrt.runtime.graph.listing import Listing, Page
from kvrt.runtime.graph.listing import new_id as _new_id
from kvrt.runtime.graph.runs import CostModel, Run
from kvrt.runtime.graph.store import SavedGraph, SavedRun, StateError, StateStore
from kvrt.runtime.graph.token_bucket import TokenBucket
from kvrt.runtime.graph.tool_estimates import ToolEstimates
from kvrt.sdk.protocol.control import GraphSpec

# A page of graphs stops before its declarations pass this together. A graph's view (GraphInfo:
# priorities, edges, transitions) is some 6 times its declaration and takes some 0.1 s a MiB
# of it to make, on the event loop: a page of the largest graphs is a few MB, not 100.
PAGE_DECLARED_BYTES = 1024**2


@dataclass(slots=True)
class GraphEntry:
    id: str
    tenant: str
    graph: AgentGraph
    costs: CostModel  # what every run of the graph taught: tool estimates, means, edges
    created: int  # unix seconds
    declared_bytes: int  # its declaration's compact JSON, as stored (the tenant's byte quota)
    runs: set[str] = field(default_factory=set)  # live run ids
    interrupted: set[str] = field(default_factory=set)  # interrupted run ids, not yet ended
    expired: set[str] = field(default_factory=set)  # expired run ids, not yet forgotten
    implicit: bool = False  # the tenant's implicit graph (in memory only)

    @property
    def learned(self) -> LearnedGraph:
        return self.costs.learned

    def criticality(self) -> Criticality:
        """The critical path of a fresh run, with what has been learned so far."""
        return critical_path(self.learned.structure(),
                             [self.costs.work(agent) for agent in self.graph.agents])


class ControlPlane:
    """`max_events_per_s`: each run's events are limited to this rate, in bursts of as many
    (None: no limit). `store`: where graphs and runs persist (None: in memory only); the
    control plane loads it and owns it from then on (`close`)."""

    def __init__(self, config: ControlConfig, clock: Callable[[], float] = time.monotonic, *,
                 store: StateStore | None = None,
                 max_events_per_s: float | None = None) -> None:
        self.config = config
        self.clock = clock
        self.max_events_per_s = max_events_per_s
        # Listings page through these in creation order (runtime/graph/listing.py).
        self._graphs: Listing[GraphEntry] = Listing(lambda e: (("tenant", e.tenant),))
        self._runs: Listing[Run] = Listing(_run_groups)  # live and interrupted
        self._keyed: dict[tuple[str, str], str] = {}  # (graph id, key) -> live run id
        self._expired: dict[str, float] = {}  # run id -> clock when it expired, oldest first
        self._implicit: dict[str, str] = {}  # tenant -> its implicit graph's id
        self._store = store
        if store is not None:
            self._load(store)

    @classmethod
    def open(cls, config: ServeConfig, clock: Callable[[], float] = time.monotonic
             ) -> ControlPlane:
        """The daemon's control plane: on `config.state_dir` if it names one (StateError, a
        ConfigError, if the dir cannot be used), with `config.limits.max_events_per_s`. What
        it loads from the dir is left out of the garbage collector's passes (see
        _loading_without_collections)."""
        store = StateStore.open(config.state_dir) if config.state_dir is not None else None
        try:
            with _loading_without_collections() if store is not None else nullcontext():
                return cls(config.control, clock, store=store,
                           max_events_per_s=config.limits.max_events_per_s)
        except BaseException:
            if store is not None:
                store.close()
            raise

    def close(self) -> None:
        """Closes the state store (everything in it is written already), and gives what its
        load froze back to the collector, so that an exit finalizes it."""
        if self._store is not None:
            self._store.close()
            self._store = None
            gc.unfreeze()

    # -- graphs -----------------------------------------------------------------------------

    def create_graph(self, spec: GraphSpec, tenant: str = DEFAULT_TENANT) -> GraphEntry:
        held = self._graphs.count(("tenant", tenant))
        if held >= self.config.max_graphs_per_tenant:
            raise QuotaExceeded("max_graphs_per_tenant", f"this tenant holds {held} graphs, its "
                                "quota (--max-graphs-per-tenant); delete graphs it no longer "
                                "runs (DELETE /v1/graphs/{id}) first")
        size = declared_bytes(spec)
        self._check_bytes(size, tenant)
        entry = self._declare(_new_id("graph"), tenant, spec, int(time.time()), size)
        if self._store is not None:
            self._store.add_graph(SavedGraph(entry.id, tenant, entry.created, spec))
        self._graphs[entry.id] = entry
        return entry

    def graph(self, graph_id: str, tenant: str = DEFAULT_TENANT) -> GraphEntry:
        entry = self._graphs.get(graph_id)
        if entry is None or entry.tenant != tenant:
            raise NotFound("graph", f"no graph with id {graph_id!r}")
        return entry

    def graphs(self, tenant: str | None = None) -> list[GraphEntry]:
        """The tenant's graphs in creation order (None: every tenant's)."""
        return list(self._graphs.values()) if tenant is None else self._graphs.group(
            ("tenant", tenant))

    def graph_page(self, tenant: str, limit: int, after: str | None = None
                   ) -> Page[GraphEntry]:
        """Up to `limit` of the tenant's graphs, in creation order, after the graph id `after`
        (which need not exist any more: see runtime/graph/listing.py); fewer if their
        declarations pass PAGE_DECLARED_BYTES together (but at least one)."""
        return self._graphs.page(("tenant", tenant), limit, after,
                                 size=(_declared_size, PAGE_DECLARED_BYTES))

    def delete_graph(self, graph_id: str, tenant: str = DEFAULT_TENANT) -> None:
        entry = self.graph(graph_id, tenant)
        if entry.runs or entry.interrupted:
            count = len(entry.runs) + len(entry.interrupted)
            raise Conflict("graph_in_use", f"graph {graph_id} has {count} run(s), live or "
                           "interrupted; end them (DELETE /v1/runs/{id}) before deleting the "
                           "graph")
        if self._store is not None and not entry.implicit:
            self._store.remove_graph(graph_id)
        if entry.implicit:  # the tenant's next implicit run makes a new one
            del self._implicit[entry.tenant]
        for run_id in entry.expired:  # they go with their graph
            del self._runs[run_id], self._expired[run_id]
        del self._graphs[graph_id]

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, graph_id: str, key: str | None = None,
                  tenant: str = DEFAULT_TENANT) -> Run:
        """Starts a run of the graph. With a `key`, the graph's live run of that key is returned
        instead when there is one, so that two callers starting one key at once (two nodes of
        one LangGraph thread) share one run."""
        entry = self.graph(graph_id, tenant)
        existing = self.keyed_run(graph_id, key, tenant)
        if existing is not None:
            return existing
        live = self.live_run_count(tenant)
        if live >= self.config.max_runs_per_tenant:
            raise QuotaExceeded("max_runs_per_tenant", f"this tenant has {live} live runs, its "
                                "quota (--max-runs-per-tenant); end finished runs "
                                "(DELETE /v1/runs/{id}) first")
        self._check_run_agents(entry, tenant)
        if self.live_run_count() >= self.config.max_live_runs:
            raise Conflict("too_many_runs", f"{self.live_run_count()} runs are live, the "
                           "server's limit; end finished runs (DELETE /v1/runs/{id}) first")
        run = self._new_run(entry, _new_id("run"), int(time.time()), key)
        if self._store is not None and not run.implicit:
            self._store.add_run(SavedRun(run.id, entry.id, tenant, key, run.created))
        self._runs[run.id] = run
        entry.runs.add(run.id)
        if key is not None:
            self._keyed[graph_id, key] = run.id
        return run

    def keyed_run(self, graph_id: str, key: str | None,
                  tenant: str = DEFAULT_TENANT) -> Run | None:
        """The graph's live run started with `key`, if any (a start by its key is activity:
        Run.touch)."""
        self.graph(graph_id, tenant)
        run_id = None if key is None else self._keyed.get((graph_id, key))
        if run_id is None:
            return None
        run = self._runs[run_id]
        run.touch()
        return run

    def run(self, run_id: str, tenant: str = DEFAULT_TENANT) -> Run:
        """The run, live, interrupted or expired."""
        run = self._runs.get(run_id)
        if run is None or run.tenant != tenant:
            raise NotFound("run", f"no run with id {run_id!r}")
        return run

    def live_run(self, run_id: str, tenant: str = DEFAULT_TENANT) -> Run:
        """The run, for events and calls: Conflict `run_interrupted` or `run_expired` if it is
        not live."""
        run = self.run(run_id, tenant)
        run.check_live()
        return run

    def runs(self, graph_id: str | None = None, key: str | None = None, *,
             tenant: str | None = None) -> list[Run]:
        """Runs, live and interrupted, of one graph, key and tenant if given (tenant None:
        every tenant's), in creation order."""
        if tenant is None:
            return [r for r in self._runs.values()
                    if (graph_id is None or r.graph_id == graph_id)
                    and (key is None or r.key == key)]
        return self.run_page(tenant, len(self._runs), None, graph_id, key).items

    def run_page(self, tenant: str, limit: int, after: str | None = None,
                 graph_id: str | None = None, key: str | None = None) -> Page[Run]:
        """Up to `limit` of the tenant's runs (of one graph and key if given), in creation
        order, after the run id `after` (which need not exist any more)."""
        if key is not None:  # the smallest group: a key's runs are one live, a few interrupted
            return self._runs.page(("key", tenant, key), limit, after,
                                   None if graph_id is None else
                                   lambda r: r.graph_id == graph_id)
        group = ("tenant", tenant) if graph_id is None else ("graph", tenant, graph_id)
        return self._runs.page(group, limit, after)

    def is_live(self, run: Run) -> bool:
        """Whether the run is live still: not ended (DELETE), expired nor interrupted."""
        return self._runs.get(run.id) is run and run.status == "live"

    def live_run_count(self, tenant: str | None = None) -> int:
        """Live runs of the tenant's graphs (None: of every tenant's)."""
        return sum(len(entry.runs) for entry in self.graphs(tenant))

    def live_run_agents(self, tenant: str) -> int:
        """The agents of the tenant's live runs together (each run counts its graph's):
        what `max_run_agents_per_tenant` bounds."""
        return sum(len(entry.graph.agents) * len(entry.runs) for entry in self.graphs(tenant))

    def end_run(self, run_id: str, tenant: str = DEFAULT_TENANT) -> Run:
        run = self.run(run_id, tenant)
        entry = self._graphs[run.graph_id]
        if run.status == "expired":  # ended already (expire): forgotten now
            del self._runs[run_id], self._expired[run_id]
            entry.expired.discard(run_id)
            return run
        run.end()
        if self._store is not None and not run.implicit:
            self._store.end_run(run_id, int(time.time()))
        del self._runs[run_id]
        if run.status == "interrupted":
            entry.interrupted.discard(run_id)
            return run
        entry.runs.discard(run_id)
        if run.key is not None:
            del self._keyed[run.graph_id, run.key]  # the key's next start begins a new run
        return run

    def idle_runs(self) -> list[Run]:
        """The live runs idle past `run_idle_timeout_s` now (none with a timeout of 0), for
        `expire`. O(runs)."""
        timeout = self.config.run_idle_timeout_s
        if not timeout:
            return []
        now = self.clock()
        # A run active within the timeout is not idle, whatever its agents did: only the others
        # have their agents' calls and tools looked at (a sweep a second, over every live run).
        return [run for run in self._runs.values() if run.status == "live"
                and run.last_active + timeout <= now
                and (deadline := run.idle_deadline(timeout)) is not None and deadline <= now]

    def expire(self, run: Run) -> None:
        """Ends an idle run as "expired" (see the module docstring); the caller releases its
        KV. A failed write to the store changes nothing."""
        if self._store is not None and not run.implicit:
            self._store.end_run(run.id, int(time.time()))
        run.expire()
        entry = self._graphs[run.graph_id]
        entry.runs.discard(run.id)
        entry.expired.add(run.id)
        if run.key is not None:
            del self._keyed[run.graph_id, run.key]  # the key's next start begins a new run
        self._expired[run.id] = self.clock()

    def forget_expired(self) -> None:
        """Forgets the runs that expired `run_idle_timeout_s` ago or more."""
        now, timeout = self.clock(), self.config.run_idle_timeout_s
        while self._expired:
            run_id, expired_at = next(iter(self._expired.items()))
            if now - expired_at < timeout:
                return
            run = self._runs.pop(run_id)
            del self._expired[run_id]
            self._graphs[run.graph_id].expired.discard(run_id)

    def implicit_run(self, key: str, tenant: str = DEFAULT_TENANT) -> ImplicitRun:
        """The live implicit run of the session `key` in the tenant, started now if there is
        none (its graph too, on the tenant's first): QuotaExceeded or Conflict
        `too_many_runs` as for `start_run`."""
        graph_id = self._implicit.get(tenant)
        if graph_id is None:
            entry = self._declare(_new_id("graph"), tenant, IMPLICIT_GRAPH, int(time.time()),
                                  0, implicit=True)  # not stored: no bytes to count
            self._graphs[entry.id] = entry
            self._implicit[tenant] = graph_id = entry.id
        run = self.start_run(graph_id, key, tenant)
        assert isinstance(run, ImplicitRun)
        return run

    def agent_of(self, attribution: Attribution,
                 tenant: str = DEFAULT_TENANT) -> tuple[Run, int] | None:
        """The run and agent index a model call is attributed to (None if unattributed)."""
        if attribution.run is None or attribution.agent is None:
            return None
        run = self.live_run(attribution.run, tenant)
        return run, run.agent_index(attribution.agent)

    # -- internals --------------------------------------------------------------------------

    def _check_bytes(self, size: int, tenant: str) -> None:
        quota = self.config.max_graph_bytes_per_tenant
        if size > quota:
            raise QuotaExceeded("max_graph_bytes_per_tenant", f"this graph's declaration is "
                                f"{size} bytes (compact JSON), more than a tenant may hold "
                                f"in all, {quota} (--max-graph-bytes-per-tenant)",
                                too_large=True)
        held = sum(entry.declared_bytes for entry in self.graphs(tenant))
        if held + size > quota:
            raise QuotaExceeded("max_graph_bytes_per_tenant", f"this tenant's graphs hold "
                                f"{held} bytes of declarations; this one's {size} would pass "
                                f"its quota of {quota} (--max-graph-bytes-per-tenant); delete "
                                "graphs it no longer runs (DELETE /v1/graphs/{id}) first")

    def _check_run_agents(self, entry: GraphEntry, tenant: str) -> None:
        quota, agents = self.config.max_run_agents_per_tenant, len(entry.graph.agents)
        if agents > quota:
            raise QuotaExceeded("max_run_agents_per_tenant", f"graph {entry.id} has {agents} "
                                f"agents, more than a tenant's live runs may have in all, "
                                f"{quota} (--max-run-agents-per-tenant)", too_large=True)
        held = self.live_run_agents(tenant)
        if held + agents > quota:
            raise QuotaExceeded("max_run_agents_per_tenant", f"this tenant's live runs have "
                                f"{held} agents together; a run of graph {entry.id} "
                                f"({agents} agents) would pass its quota of {quota} "
                                "(--max-run-agents-per-tenant); end finished runs "
                                "(DELETE /v1/runs/{id}) first")

    def _declare(self, graph_id: str, tenant: str, spec: GraphSpec, created: int,
                 size: int, implicit: bool = False) -> GraphEntry:
        graph = declare_graph(spec, self.config.default_output_tokens)
        declared = {(agent.name, tool): seconds
                    for agent in graph.agents for tool, seconds in agent.tools.items()}
        estimates = ToolEstimates(declared)
        learned = LearnedGraph(graph, estimates, self.config.transition_prior_observations,
                               self.config.min_branch_share,
                               on_fold=None if implicit else lambda: self._save_learning(graph_id))
        costs = CostModel(self.config.seconds_per_output_token, learned)
        return GraphEntry(graph_id, tenant, graph, costs, created, size, implicit=implicit)

    def _save_learning(self, graph_id: str) -> None:
        if self._store is not None:
            self._store.save_learning(graph_id, self._graphs[graph_id].learned.saved())

    def _new_run(self, entry: GraphEntry, run_id: str, created: int, key: str | None,
                 interrupted: bool = False) -> Run:
        rate = self.max_events_per_s
        budget = (None if rate is None or interrupted
                  else TokenBucket.full(rate, max(rate, 1.0), self.clock()))
        kind = ImplicitRun if entry.implicit else Run
        return kind(run_id, entry.id, entry.graph, entry.costs, created, self.clock, key,
                    tenant=entry.tenant, status="interrupted" if interrupted else "live",
                    event_budget=budget)

    def _load(self, store: StateStore) -> None:
        for saved in store.graphs():
            try:
                entry = self._declare(saved.id, saved.tenant, saved.spec, saved.created,
                                      declared_bytes(saved.spec))
            except GraphError as exc:
                raise StateError(f"graph {saved.id} in {store.path} is no longer valid: {exc}"
                                 ) from None
            self._graphs[entry.id] = entry
        for graph_id, saved_learning in store.learning().items():
            try:
                self._graphs[graph_id].learned.restore(saved_learning)
            except (KeyError, ValueError) as exc:
                raise StateError(f"the statistics of graph {graph_id} in {store.path} do not "
                                 f"fit it: {exc}") from None
        for saved_run in store.open_runs():
            owner = self._graphs.get(saved_run.graph_id)
            if owner is None or owner.tenant != saved_run.tenant:
                raise StateError(f"run {saved_run.id} in {store.path} names graph "
                                 f"{saved_run.graph_id}, which is not there")
            run = self._new_run(owner, saved_run.id, saved_run.created, saved_run.key, True)
            self._runs[run.id] = run
            owner.interrupted.add(run.id)


@contextmanager
def _loading_without_collections() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while a state dir loads, then freezes what it
    made (gc.freeze). Loading the largest graphs a tenant may hold makes millions of objects
    that live as long as the daemon: each collection while they are made would walk all made
    so far (two thirds of the load's time, measured with runtime/bench/restart_speed.py), and
    each full collection afterwards would walk them again, a pause of the event loop. Frozen,
    they are still freed by reference counting (a deleted graph), only never scanned. Garbage
    from before is collected first, so that none of it is frozen with them; `close` unfreezes
    (objects left frozen at exit are never finalized: extensions report them as leaks)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _declared_size(entry: GraphEntry) -> int:
    return entry.declared_bytes


def declared_bytes(spec: GraphSpec) -> int:
    """What a declaration counts against its tenant's byte quota: its compact JSON, every field
    written (defaults too), which is what the state store keeps of it. Independent of how the
    client formatted its request; GraphInfo.declared_bytes shows it."""
    return len(msgspec.json.encode(spec))


def _run_groups(run: Run) -> tuple[tuple[str | None, ...], ...]:
    by_key = (("key", run.tenant, run.key),) if run.key is not None else ()
    return (("tenant", run.tenant), ("graph", run.tenant, run.graph_id), *by_key)
