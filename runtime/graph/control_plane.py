"""The registry of declared graphs and live runs. Lives on the server's event loop (no locks):
each method runs to its end without yielding, which is what makes `start_run` by key atomic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.engine.protocol import Attribution
from kvrt.runtime.graph.critical_path import Criticality, critical_path
from kvrt.runtime.graph.declaration import AgentGraph, declare_graph
from kvrt.runtime.graph.errors import Conflict, NotFound
from kvrt.runtime.graph.runs import CostModel, Run
from kvrt.runtime.graph.tool_estimates import ToolEstimates
from kvrt.sdk.protocol.control import GraphSpec


@dataclass(slots=True)
class GraphEntry:
    id: str
    graph: AgentGraph
    costs: CostModel  # tool estimates learned from every run of the graph
    created: int  # unix seconds
    runs: set[str] = field(default_factory=set)  # live run ids

    def criticality(self) -> Criticality:
        """The critical path of a fresh run, with what has been learned of the tools so far."""
        return critical_path(self.graph.structure,
                             [self.costs.work(agent) for agent in self.graph.agents])


class ControlPlane:
    def __init__(self, config: ControlConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._graphs: dict[str, GraphEntry] = {}
        self._runs: dict[str, Run] = {}
        self._keyed: dict[tuple[str, str], str] = {}  # (graph id, key) -> live run id

    def create_graph(self, spec: GraphSpec) -> GraphEntry:
        graph = declare_graph(spec, self.config.default_output_tokens)
        declared = {(agent.name, tool): seconds
                    for agent in graph.agents for tool, seconds in agent.tools.items()}
        costs = CostModel(ToolEstimates(declared), self.config.seconds_per_output_token)
        entry = GraphEntry(_new_id("graph"), graph, costs, int(time.time()))
        self._graphs[entry.id] = entry
        return entry

    def graph(self, graph_id: str) -> GraphEntry:
        entry = self._graphs.get(graph_id)
        if entry is None:
            raise NotFound("graph", f"no graph with id {graph_id!r}")
        return entry

    def graphs(self) -> list[GraphEntry]:
        return list(self._graphs.values())

    def delete_graph(self, graph_id: str) -> None:
        entry = self.graph(graph_id)
        if entry.runs:
            raise Conflict("graph_in_use", f"graph {graph_id} has {len(entry.runs)} live run(s); "
                           "end them (DELETE /v1/runs/{id}) before deleting the graph")
        del self._graphs[graph_id]

    def start_run(self, graph_id: str, key: str | None = None) -> Run:
        """Starts a run of the graph. With a `key`, the graph's live run of that key is returned
        instead when there is one, so that two callers starting one key at once (two nodes of
        one LangGraph thread) share one run."""
        entry = self.graph(graph_id)
        existing = self.keyed_run(graph_id, key)
        if existing is not None:
            return existing
        if len(self._runs) >= self.config.max_live_runs:
            raise Conflict("too_many_runs", f"{len(self._runs)} runs are live, the server's "
                           "limit; end finished runs (DELETE /v1/runs/{id}) first")
        run = Run(_new_id("run"), entry.id, entry.graph, entry.costs, int(time.time()),
                  self.clock, key)
        self._runs[run.id] = run
        entry.runs.add(run.id)
        if key is not None:
            self._keyed[graph_id, key] = run.id
        return run

    def keyed_run(self, graph_id: str, key: str | None) -> Run | None:
        """The graph's live run started with `key`, if any."""
        run_id = None if key is None else self._keyed.get((graph_id, key))
        return None if run_id is None else self._runs[run_id]

    def run(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound("run", f"no live run with id {run_id!r}")
        return run

    def runs(self, graph_id: str | None = None, key: str | None = None) -> list[Run]:
        return [r for r in self._runs.values()
                if (graph_id is None or r.graph_id == graph_id) and (key is None or r.key == key)]

    def end_run(self, run_id: str) -> Run:
        run = self.run(run_id)
        del self._runs[run_id]
        self._graphs[run.graph_id].runs.discard(run_id)
        if run.key is not None:
            del self._keyed[run.graph_id, run.key]  # the key's next start begins a new run
        return run

    def agent_of(self, attribution: Attribution) -> tuple[Run, int] | None:
        """The run and agent index a model call is attributed to (None if unattributed)."""
        if attribution.run is None or attribution.agent is None:
            return None
        run = self.run(attribution.run)
        return run, run.agent_index(attribution.agent)


def _new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"
