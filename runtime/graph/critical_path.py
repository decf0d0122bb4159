"""Critical path and priorities over an agent graph, loops included.

Agent graphs may have cycles (a ReAct agent calling itself, a writer <-> reviewer loop). The
structure is therefore the graph's condensation: each strongly connected component (a loop, or
a single agent) becomes one node whose cost is the sum of its members' costs. A loop's
repetitions are in those costs already: an agent's cost is its whole expected work in a pass,
every call it is expected to make (runtime/graph/learning.py). The condensation is a DAG, so
longest paths are two linear passes.

networkx builds the condensation once per set of edges (a graph's likely edges change rarely);
the per-event recomputation below is plain Python over precomputed adjacency lists (no
networkx, no allocation per edge), so it stays in the low milliseconds for thousands of agents.

For a component c with cost w(c):
    down(c)    = w(c) + max(down(s) for successors s)    longest remaining path from c on
    up(c)      = w(c) + max(up(p) for predecessors p)    longest path ending at c
    through(c) = up(c) + down(c) - w(c)                  longest path through c
    L          = max(down(c))                            the critical path's length
An agent is on a critical path when through = L (zero slack). Its criticality is through / L:
1 on the critical path, lower the more slack it has (1 for every agent when L = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from kvrt.sdk.protocol.control import DEFAULT_EXPECTED_ITERATIONS

_TOLERANCE = 1e-9  # relative: float sums along different paths may differ in the last bits


@dataclass(frozen=True, slots=True)
class GraphStructure:
    """Components numbered in a topological order (ties broken by declaration order)."""

    component: tuple[int, ...]  # agent -> its component
    members: tuple[tuple[int, ...], ...]  # component -> its agents, in declaration order
    successors: tuple[tuple[int, ...], ...]
    predecessors: tuple[tuple[int, ...], ...]
    # Expected iterations of each component as its edges state them (1 for no loop): what a
    # declared loop is expected to repeat, the prior of its members' calls. Not a weight.
    iterations: tuple[int, ...]

    @classmethod
    def build(cls, num_agents: int, edges: Sequence[tuple[int, int, int | None]]) -> GraphStructure:
        """`edges` are (source, target, expected_iterations or None) over agent indices."""
        graph = nx.DiGraph()
        graph.add_nodes_from(range(num_agents))
        graph.add_edges_from((s, t) for s, t, _ in edges)
        dag = nx.condensation(graph)
        order = list(nx.lexicographical_topological_sort(
            dag, key=lambda c: min(dag.nodes[c]["members"])))
        renumber = {old: new for new, old in enumerate(order)}
        component = [0] * num_agents
        for agent, old in dag.graph["mapping"].items():
            component[agent] = renumber[old]
        members = tuple(tuple(sorted(dag.nodes[old]["members"])) for old in order)
        successors = tuple(tuple(sorted(renumber[s] for s in dag.successors(old)))
                           for old in order)
        predecessors = tuple(tuple(sorted(renumber[p] for p in dag.predecessors(old)))
                             for old in order)
        return cls(tuple(component), members, successors, predecessors,
                   _iterations(component, len(order), edges))

    def in_loop(self, source: int, target: int) -> bool:
        return self.component[source] == self.component[target]


def _iterations(component: list[int], count: int,
                edges: Sequence[tuple[int, int, int | None]]) -> tuple[int, ...]:
    """A loop runs as often as the largest count its edges state, or the default if none does
    (nested loops share one component, so the outer count is the useful one)."""
    loops: dict[int, int | None] = {}
    for source, target, stated in edges:
        c = component[source]
        if c == component[target]:
            known = loops.get(c)
            loops[c] = stated if known is None else max(known, stated or 0)
    return tuple(
        1 if c not in loops else (loops[c] or DEFAULT_EXPECTED_ITERATIONS) for c in range(count)
    )


@dataclass(frozen=True, slots=True)
class Criticality:
    path: list[int]  # agents on one critical path, in order (a loop's members together)
    length: float  # seconds of work along it
    remaining: list[float]  # per agent: down() of its component
    through: list[float]  # per agent: through() of its component
    costs: Sequence[float] = ()  # per agent: its own remaining work (the input)

    def criticality(self, agent: int) -> float:
        # At most 1: sums along different paths may differ in the last bits.
        return min(self.through[agent] / self.length, 1.0) if self.length > 0 else 1.0

    def on_critical_path(self, agent: int) -> bool:
        return self.through[agent] >= self.length * (1 - _TOLERANCE)

    def start_after(self, agent: int) -> float:
        """Seconds of work that must end before the agent's component can start: the longest
        path of remaining work into it (KVFlow's steps-to-execution, in seconds)."""
        return max(self.through[agent] - self.remaining[agent], 0.0)


def critical_path(structure: GraphStructure, costs: Sequence[float]) -> Criticality:
    """Longest paths over the condensation, with `costs[agent]` in seconds."""
    members, succ, pred = structure.members, structure.successors, structure.predecessors
    count = len(members)
    weight = [sum(costs[a] for a in members[c]) for c in range(count)]
    down = [0.0] * count
    for c in range(count - 1, -1, -1):
        down[c] = weight[c] + max((down[s] for s in succ[c]), default=0.0)
    up = [0.0] * count
    for c in range(count):
        up[c] = weight[c] + max((up[p] for p in pred[c]), default=0.0)
    length = max(down)
    path: list[int] = []
    # The first maximum has no predecessor: one would come earlier with at least as much.
    at: int | None = down.index(length)
    while at is not None:
        path.extend(members[at])
        at = max(succ[at], key=lambda s: (down[s], -s), default=None)
    component = structure.component
    return Criticality(
        path=path,
        length=length,
        remaining=[down[component[a]] for a in range(len(component))],
        through=[up[component[a]] + down[component[a]] - weight[component[a]]
                 for a in range(len(component))],
        costs=costs,
    )
