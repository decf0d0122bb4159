"""A declared agent graph, validated: what msgspec cannot check alone (names, edges, loops)."""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.runtime.graph.critical_path import GraphStructure
from kvrt.runtime.graph.errors import GraphError
from kvrt.sdk.protocol.control import EdgeSpec, GraphSpec


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    system: str | None
    tools: dict[str, float]  # declared expected seconds per call
    expected_output_tokens: int
    importance: float


@dataclass(frozen=True, slots=True)
class Edge:
    source: int  # agent indices
    target: int
    expected_iterations: int | None  # as stated


@dataclass(frozen=True, slots=True)
class AgentGraph:
    name: str
    reuse: str
    agents: tuple[Agent, ...]
    index: dict[str, int]  # agent name -> index
    edges: tuple[Edge, ...]
    structure: GraphStructure

    def iterations(self, edge: Edge) -> int:
        """The expected iteration count of the loop the edge is in (1 outside loops)."""
        return self.structure.iterations[self.structure.component[edge.source]]


def declare_graph(spec: GraphSpec, default_output_tokens: int) -> AgentGraph:
    index: dict[str, int] = {}
    for i, agent in enumerate(spec.agents):
        if agent.name in index:
            raise GraphError(
                f"agent name {agent.name!r} is declared twice (agents[{index[agent.name]}] and "
                f"agents[{i}])", param=f"agents[{i}].name")
        index[agent.name] = i
    edges = _edges(spec, index)
    structure = GraphStructure.build(
        len(index), [(e.source, e.target, e.expected_iterations) for e in edges])
    for i, edge in enumerate(edges):
        if edge.expected_iterations is not None and not structure.in_loop(edge.source,
                                                                          edge.target):
            names = f"{spec.agents[edge.source].name} -> {spec.agents[edge.target].name}"
            raise GraphError(
                f"edges[{i}] ({names}) sets expected_iterations but is not part of a loop; "
                "only an edge on a cycle repeats", param=f"edges[{i}].expected_iterations")
    agents = tuple(
        Agent(a.name, a.system, dict(a.tools),
              default_output_tokens if a.expected_output_tokens is None
              else a.expected_output_tokens, a.importance)
        for a in spec.agents)
    return AgentGraph(spec.name, spec.reuse, agents, index, tuple(edges), structure)


def _edges(spec: GraphSpec, index: dict[str, int]) -> list[Edge]:
    edges: list[Edge] = []
    seen: dict[tuple[int, int], int] = {}
    for i, item in enumerate(spec.edges):
        source, target, iterations = (
            (item.source, item.target, item.expected_iterations) if isinstance(item, EdgeSpec)
            else (item[0], item[1], None))
        for end, name in (("from", source), ("to", target)):
            if name not in index:
                raise GraphError(f"edges[{i}] refers to an unknown agent {name!r} (its {end!r} "
                                 "end); declare it in `agents` first", param=f"edges[{i}]")
        pair = (index[source], index[target])
        if pair in seen:
            raise GraphError(f"edges[{i}] repeats the edge {source} -> {target} of "
                             f"edges[{seen[pair]}]", param=f"edges[{i}]")
        seen[pair] = i
        edges.append(Edge(pair[0], pair[1], iterations))
    return edges
