"""Critical path and priorities over an agent graph, loops included.

Agent graphs may have cycles (a ReAct agent calling itself, a writer <-> reviewer loop). The
structure is therefore the graph's condensation: each strongly connected component (a loop, or
a single agent) becomes one node whose cost is the sum of its members' costs. A loop's
repetitions are in those costs already: an agent's cost is its whole expected work in a pass,
every call it is expected to make (runtime/graph/learning.py). The condensation is a DAG, so
longest paths are two linear passes.

The condensation is built once per set of edges (a graph's likely edges change rarely), in
O(V + E): Tarjan's components, then a topological order (Kahn's, ties broken by a component's
first agent). It is plain Python over lists, as networkx's condensation gives it (the tests
hold it to networkx) but some 5x faster: a daemon restarting on a state dir builds every
declared graph's, up to 65,536 edges each. The per-event recomputation below is plain Python
over the precomputed adjacency lists too (no allocation per edge), so it stays in the low
milliseconds for thousands of agents.

For a component c with cost w(c):
    down(c)    = w(c) + max(down(s) for successors s)    longest remaining path from c on
    up(c)      = w(c) + max(up(p) for predecessors p)    longest path ending at c
    through(c) = up(c) + down(c) - w(c)                  longest path through c
    L          = max(down(c))                            the critical path's length
An agent is on a critical path when through = L (zero slack). Its criticality is through / L:
1 on the critical path, lower the more slack it has (1 for every agent when L = 0).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

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
        out: list[list[int]] = [[] for _ in range(num_agents)]
        for source, target, _ in edges:
            out[source].append(target)
        found, count = _components(out)  # numbered as Tarjan finds them, not yet in order
        first = [num_agents] * count  # each component's first agent, its key in the order
        for agent in range(num_agents - 1, -1, -1):
            first[found[agent]] = agent
        linked: list[set[int]] = [set() for _ in range(count)]
        for source, target, _ in edges:
            if found[source] != found[target]:
                linked[found[source]].add(found[target])
        renumber = _topological(linked, first)
        component = [renumber[c] for c in found]
        members: list[list[int]] = [[] for _ in range(count)]
        successors: list[list[int]] = [[] for _ in range(count)]
        predecessors: list[list[int]] = [[] for _ in range(count)]
        for agent in range(num_agents):
            members[component[agent]].append(agent)
        for old, targets in enumerate(linked):
            for target in targets:
                successors[renumber[old]].append(renumber[target])
                predecessors[renumber[target]].append(renumber[old])
        return cls(tuple(component), tuple(map(tuple, members)),
                   tuple(tuple(sorted(s)) for s in successors),
                   tuple(tuple(sorted(p)) for p in predecessors),
                   _iterations(component, count, edges))

    def in_loop(self, source: int, target: int) -> bool:
        return self.component[source] == self.component[target]


def _components(out: list[list[int]]) -> tuple[list[int], int]:
    """Tarjan's strongly connected components, without recursion: each agent's component, and
    how many there are."""
    count = len(out)
    order, low, component = [-1] * count, [0] * count, [-1] * count
    stack: list[int] = []  # agents visited whose component is not known yet
    seen = found = 0
    for root in range(count):
        if order[root] >= 0:
            continue
        order[root] = low[root] = seen
        seen += 1
        stack.append(root)
        path = [(root, iter(out[root]))]
        while path:
            agent, targets = path[-1]
            for target in targets:
                if order[target] < 0:  # a new agent: go down into it
                    order[target] = low[target] = seen
                    seen += 1
                    stack.append(target)
                    path.append((target, iter(out[target])))
                    break
                if component[target] < 0:  # on the stack: a way back up
                    low[agent] = min(low[agent], order[target])
            else:  # every edge out of `agent` followed
                path.pop()
                if path:
                    parent = path[-1][0]
                    low[parent] = min(low[parent], low[agent])
                if low[agent] == order[agent]:  # it roots a component: pop it
                    while True:
                        member = stack.pop()
                        component[member] = found
                        if member == agent:
                            break
                    found += 1
    return component, found


def _topological(successors: list[set[int]], key: list[int]) -> list[int]:
    """Each component's place in a topological order of the components (a DAG), ties broken
    by the smallest `key` (Kahn's algorithm over a heap)."""
    waiting = [0] * len(successors)  # predecessors not yet placed
    for targets in successors:
        for target in targets:
            waiting[target] += 1
    ready = [(key[c], c) for c in range(len(successors)) if not waiting[c]]
    heapq.heapify(ready)
    place = [0] * len(successors)
    for position in range(len(successors)):
        _, c = heapq.heappop(ready)
        place[c] = position
        for target in successors[c]:
            waiting[target] -= 1
            if not waiting[target]:
                heapq.heappush(ready, (key[target], target))
    return place


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
