"""What a graph's runs teach the daemon about it: which declared edges are taken, and how much
work each agent does in one pass through the graph (an episode, runtime/graph/episodes.py).

A declaration is a superset of what happens: a LangGraph router or `Command(goto=...)` may
lead to every node, so the declared graph is often one big loop in which every agent is
critical. The declaration is therefore only the prior, and fades as runs are observed:

    statistic                    counted                          prior (declaration)
    ---------------------------  -------------------------------  ----------------------------
    count(A, B)                  live, at each observed           -
                                 transition (A, B); A may be
                                 START, B may be END
    left(A)                      sum of count(A, *), END too      -
    likely(A, B), declared edge  left(A) < prior_observations,    every declared edge
                                 or count(A, B) / left(A) >=
                                 min_share
    expected calls of A          (prior + calls) / (1 + E)        its declared loop's
      per episode                                                 iterations, else 1
    output tokens per call       (prior calls x prior tokens +    declared expected output
                                 tokens) / (prior calls + ended   tokens
                                 calls)
    expected calls of (A, tool)  (prior + calls) / (1 + E)        A's prior calls for a
      per episode                                                 declared tool, else 0

E is the number of folded episodes; `calls` and `tokens` are sums over them (tokens of ended
calls only). The prior is worth one pseudo-episode: one episode of the declared work.

Priorities use the structure (GraphStructure) of the likely edges. It is rebuilt (Tarjan's
components, O(V+E)) only when the set of likely edges has changed, and only when next asked
for; counting a transition updates the likely flags of its source's edges only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvrt.runtime.graph.critical_path import GraphStructure
from kvrt.runtime.graph.declaration import AgentGraph
from kvrt.runtime.graph.store import SavedAgentMeans, SavedLearning
from kvrt.runtime.graph.tool_estimates import ToolEstimates

START, END = -1, -2  # the pseudo-agents before an episode's first call and after its last
START_NAME, END_NAME = "__start__", "__end__"


class EpisodePart(Protocol):
    """One agent's counters of one episode, as they are folded."""

    calls: int  # model calls started
    ended_calls: int
    ended_tokens: int  # output tokens of the ended calls
    tools: dict[str, int]  # tool calls started, by tool


@dataclass(slots=True)
class AgentMeans:
    """An agent's learned work per episode: its prior plus the sums over folded episodes."""

    prior_calls: int
    prior_tokens: int
    calls: int = 0
    ended_calls: int = 0
    ended_tokens: int = 0
    tool_priors: dict[str, int] = field(default_factory=dict)
    tool_calls: dict[str, int] = field(default_factory=dict)  # every tool seen or declared

    def expected_calls(self, episodes: int) -> float:
        return (self.prior_calls + self.calls) / (1 + episodes)

    @property
    def tokens_per_call(self) -> float:
        return ((self.prior_calls * self.prior_tokens + self.ended_tokens)
                / (self.prior_calls + self.ended_calls))

    def expected_tool_calls(self, tool: str, episodes: int) -> float:
        return (self.tool_priors.get(tool, 0) + self.tool_calls[tool]) / (1 + episodes)


class LearnedGraph:
    """`on_fold` is called after each fold and unfold (the control plane persists the
    statistics then)."""

    def __init__(self, graph: AgentGraph, estimates: ToolEstimates, prior_observations: int,
                 min_share: float, on_fold: Callable[[], None] | None = None) -> None:
        self.graph, self.estimates = graph, estimates
        self.prior_observations, self.min_share = prior_observations, min_share
        self.on_fold = on_fold
        self.episodes = 0
        self.counts: dict[tuple[int, int], int] = {}
        self.left: dict[int, int] = {}
        declared = graph.structure
        self.agents = []
        for i, agent in enumerate(graph.agents):
            prior = declared.iterations[declared.component[i]]
            self.agents.append(AgentMeans(
                prior, agent.expected_output_tokens,
                tool_priors={tool: prior for tool in agent.tools},
                tool_calls={tool: 0 for tool in agent.tools}))
        predecessors: list[list[int]] = [[] for _ in graph.agents]
        self._out: list[list[int]] = [[] for _ in graph.agents]  # edge indices, by source
        for e, edge in enumerate(graph.edges):
            predecessors[edge.target].append(edge.source)
            self._out[edge.source].append(e)
        self.predecessors = tuple(tuple(p) for p in predecessors)  # declared, self included
        self._likely = [True] * len(graph.edges)
        self._structure = declared  # of the likely edges: every declared one, so far
        self._stale = False

    # -- transitions -------------------------------------------------------------------------

    def count(self, source: int, target: int, times: int = 1) -> None:
        """Counts a transition (`times` -1: takes one back)."""
        self.counts[source, target] = self.counts.get((source, target), 0) + times
        self.left[source] = self.left.get(source, 0) + times
        if not self.counts[source, target]:
            del self.counts[source, target]
        if source >= 0:
            self._refresh(source)

    def likely(self, source: int, target: int) -> bool:
        left = self.left.get(source, 0)
        return left < self.prior_observations or (
            self.counts.get((source, target), 0) / left >= self.min_share)

    def share(self, source: int, target: int) -> float | None:
        left = self.left.get(source, 0)
        return self.counts.get((source, target), 0) / left if left else None

    def structure(self) -> GraphStructure:
        """The structure of the likely edges, rebuilt if they changed since it was built."""
        if self._stale:
            edges = [(e.source, e.target, e.expected_iterations)
                     for e, likely in zip(self.graph.edges, self._likely) if likely]
            self._structure = GraphStructure.build(len(self.graph.agents), edges)
            self._stale = False
        return self._structure

    def edge_likely(self, edge_index: int) -> bool:
        return self._likely[edge_index]

    def _refresh(self, source: int) -> None:
        for e in self._out[source]:
            likely = self.likely(source, self.graph.edges[e].target)
            if likely != self._likely[e]:
                self._likely[e] = likely
                self._stale = True

    # -- episodes ----------------------------------------------------------------------------

    def fold(self, parts: Sequence[EpisodePart], sign: int = 1) -> None:
        """Adds one finished episode's per-agent counters to the means (`sign` -1: takes
        back an episode folded too early, see episodes.py)."""
        for means, part in zip(self.agents, parts):
            means.calls += sign * part.calls
            means.ended_calls += sign * part.ended_calls
            means.ended_tokens += sign * part.ended_tokens
            for tool, calls in part.tools.items():
                means.tool_calls[tool] = means.tool_calls.get(tool, 0) + sign * calls
        self.episodes += sign
        if self.on_fold is not None:
            self.on_fold()

    # -- persistence -------------------------------------------------------------------------

    def name(self, index: int) -> str:
        return (START_NAME if index == START else END_NAME if index == END
                else self.graph.agents[index].name)

    def saved(self) -> SavedLearning:
        return SavedLearning(
            episodes=self.episodes,
            transitions=[(self.name(s), self.name(t), n)
                         for (s, t), n in sorted(self.counts.items())],
            agents=[SavedAgentMeans(name=agent.name, calls=means.calls,
                                    ended_calls=means.ended_calls,
                                    ended_tokens=means.ended_tokens,
                                    tool_calls=sorted(means.tool_calls.items()))
                    for agent, means in zip(self.graph.agents, self.agents)],
            tool_estimates=[(agent, tool, e.observations, e.learned)
                            for (agent, tool), e in self.estimates.items()
                            if e.learned is not None],
        )

    def restore(self, saved: SavedLearning) -> None:
        """Takes back what `saved` gave (names this graph lacks are ValueError)."""
        index = {**self.graph.index, START_NAME: START, END_NAME: END}
        try:
            self.counts = {(index[s], index[t]): n for s, t, n in saved.transitions}
            for agent in saved.agents:
                means = self.agents[self.graph.index[agent.name]]
                means.calls, means.ended_calls = agent.calls, agent.ended_calls
                means.ended_tokens = agent.ended_tokens
                means.tool_calls.update(agent.tool_calls)
        except KeyError as exc:
            raise ValueError(f"the saved statistics name agent {exc}, which the graph "
                             "does not declare") from None
        self.left = {}
        for (source, _), n in self.counts.items():
            self.left[source] = self.left.get(source, 0) + n
        for source in range(len(self.graph.agents)):
            self._refresh(source)
        self.episodes = saved.episodes
        for agent_name, tool, observations, learned in saved.tool_estimates:
            self.estimates.restore(agent_name, tool, observations, learned)
