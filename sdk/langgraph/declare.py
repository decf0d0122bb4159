"""The kvrt agent graph of a compiled LangGraph `StateGraph`: which nodes are agents, where
control can pass from one agent to another, and which tools each may call.

Read from the builder (`compiled.builder`), node by node:

    a node that is ...                        is declared as ...
    ----------------------------------------  ------------------------------------------------
    a function or runnable                    an agent of that name
    a `ToolNode` (create_react_agent's        no agent: the edges through it are contracted
      `tools`, a `ToolNode([...])`)           (agent -> tools -> agent is agent -> agent), and
                                              its tools are tools of the agents leading into it
    a compiled graph (a subgraph added as     its own nodes, as agents `outer/inner` (nested:
      a node)                                 `a/b/c`), entered at its first nodes and left
                                              from those that may end it

Subgraphs are expanded because each inner node makes its own model calls and tool calls: it
holds its own KV and waits on its own tools, so the daemon can offload the one that waits and
keep the one about to run; one agent for the whole subgraph would blur the two. A graph invoked
from inside a node's function cannot be seen from the builder; its calls stay its node's.

Where control goes: fixed edges (also `add_edge([a, b], c)`), conditional edges (their path
map, the list given for `Send` fan-outs, else a `Literal` return annotation of the routing
function, else every node), `Command` destinations declared with `add_node(...,
destinations=...)` or a `Command[Literal[...]]` annotation, and for a node with no edge at all
(routing by returning `Command(goto=...)`, or ending the graph) every node. The scheduler needs
a superset of the real edges (a missing edge hides work still to come on the critical path; an
extra one only widens it), so where the code does not say, every node is the honest answer; the
daemon learns the transitions that actually happen.

Tools of a ToolNode are declared with the seconds a call is expected to take when the caller
gives them (`agents={"tools": {"tools": {"search": 2.0}}}` for the ToolNode named `tools`, or
on an agent itself); a tool without an estimate is left out of the declaration (AgentSpec.tools
needs seconds), and the daemon learns its duration from the calls it sees.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from langgraph.constants import END, START
from langgraph.prebuilt import ToolNode
from langgraph.pregel import Pregel

from kvrt.sdk.graph import Graph
from kvrt.sdk.langgraph.context import SEP
from kvrt.sdk.protocol.control import Reuse


def agent_graph(
    compiled: Any,
    name: str,
    *,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    expected_iterations: int | None = None,
    reuse: Reuse = "exact",
) -> Graph:
    """The declaration of `compiled` (a CompiledStateGraph). `agents` maps an agent to
    `Graph.agent` options (system, tools, expected_output_tokens, importance), or a ToolNode to
    `{"tools": {tool: seconds}}`; `expected_iterations`, when given, is set on every edge that
    lies on a loop."""
    shape = Shape.of(compiled)
    options = {key: dict(value) for key, value in (agents or {}).items()}
    unknown = sorted(set(options) - set(shape.agents) - set(shape.tool_nodes))
    if unknown:
        raise ValueError(f"agents names {unknown}, which are neither agents "
                         f"{shape.agents} nor ToolNodes {sorted(shape.tool_nodes)} of the graph")
    for node in shape.tool_nodes:
        extra = sorted(set(options.get(node, {})) - {"tools"})
        if extra:
            raise ValueError(f"{node!r} is a ToolNode, not an agent: only its tools' seconds "
                             f"may be given ({{'tools': {{...}}}}), not {extra}")
    graph = Graph(name, reuse=reuse)
    for agent in shape.agents:
        own = options.get(agent, {})
        seconds: dict[str, float] = {}
        for node in shape.leads_to[agent]:
            seconds.update(options.get(node, {}).get("tools", {}))
        seconds.update(own.get("tools") or {})
        graph.agent(agent, **{**own, "tools": seconds})
    looped = loop_edges(shape.edges)
    for source, target in shape.edges:
        iterations = expected_iterations if (source, target) in looped else None
        graph.edge(source, target, expected_iterations=iterations)
    return graph


@dataclass(slots=True)
class Shape:
    """A compiled graph as agents: `edges` between agents (ToolNodes and subgraph boundaries
    contracted), `tool_nodes` (qualified name -> its tools), `leads_to` (agent -> the ToolNodes
    it reaches directly)."""

    agents: list[str] = field(default_factory=list)
    tool_nodes: dict[str, list[str]] = field(default_factory=dict)
    leads_to: dict[str, list[str]] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    _next: dict[str, list[str]] = field(default_factory=dict)  # raw, with pass-through nodes

    @classmethod
    def of(cls, compiled: Any) -> Shape:
        shape = cls()
        shape._add(compiled, "", START, END)
        shape._contract()
        return shape

    def _add(self, compiled: Any, prefix: str, start: str, end: str) -> None:
        """Adds a graph's nodes (names prefixed) and its raw edges; its START is `start` and
        its END `end` (the enclosing node's entry and exit)."""
        nodes = list(compiled.builder.nodes)
        exits: dict[str, str] = {}  # a subgraph node -> the pass-through node that leaves it
        for node in nodes:
            runnable = compiled.builder.nodes[node].runnable
            qualified = prefix + node
            if isinstance(runnable, Pregel):
                exits[node] = qualified + SEP + END
                self._add(runnable, qualified + SEP, qualified, exits[node])
            elif isinstance(runnable, ToolNode):
                self.tool_nodes[qualified] = list(runnable.tools_by_name)
            else:
                self.agents.append(qualified)

        def name(node: str) -> str:
            return start if node == START else end if node == END else prefix + node

        for source, target in raw_edges(compiled, nodes):
            tail = exits.get(source) or name(source)
            self._next.setdefault(tail, []).append(name(target))

    def _contract(self) -> None:
        """Agent-to-agent edges: from each agent, through every node that is not one."""
        agents = set(self.agents)
        for agent in self.agents:
            self.leads_to[agent] = []
            seen, frontier = {agent}, list(self._next.get(agent, ()))
            while frontier:
                node = frontier.pop(0)
                if node in agents:
                    self.edges.append((agent, node))
                if node in seen or node in agents:
                    continue
                seen.add(node)
                if node in self.tool_nodes:
                    self.leads_to[agent].append(node)
                frontier += self._next.get(node, ())
        self.edges = list(dict.fromkeys(self.edges))


def raw_edges(compiled: Any, nodes: list[str]) -> list[tuple[str, str]]:
    """Every edge of one graph's builder, START and END included, in node order."""
    builder = compiled.builder
    order = {node: i for i, node in enumerate([START, *nodes, END])}
    fixed = sorted(builder._all_edges, key=lambda edge: (order[edge[0]], order[edge[1]]))
    edges = list(fixed)
    for source, branches in builder.branches.items():
        for branch in branches.values():
            edges += [(source, target) for target in branch_targets(branch, nodes)]
    for node in nodes:
        edges += [(node, target) for target in builder.nodes[node].ends or ()]
    routed = {source for source, _ in edges}
    for node in nodes:  # no edge at all: it routes by Command(goto=...), or ends the graph
        if node not in routed:
            edges += [(node, target) for target in [*nodes, END]]
    edges.sort(key=lambda edge: order[edge[0]])
    return list(dict.fromkeys(edges))


def branch_targets(branch: Any, nodes: list[str]) -> list[str]:
    """Where a conditional edge may lead (a BranchSpec: `.path`, `.ends`), END included."""
    if branch.ends:
        return list(branch.ends.values())
    names = annotated_names(_function_of(branch.path))
    if names is None:
        return [*nodes, END]
    return [node for node in [*nodes, END] if node in names]
def annotated_names(function: Any) -> set[str] | None:
    """The node names a routing function's return annotation allows: the literals of
    `Literal[...]`, also inside unions and sequences; None if it allows anything else."""
    try:
        annotation = typing.get_type_hints(function).get("return")
    except Exception:  # no function, or an annotation that does not resolve
        return None
    return None if annotation is None else _literals(annotation)


def _literals(annotation: Any) -> set[str] | None:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = typing.get_args(annotation)
        return {v for v in values if isinstance(v, str)} if all(
            isinstance(v, str) for v in values) else None
    if annotation is type(None):
        return set()
    if origin in (typing.Union, types.UnionType) or origin in _SEQUENCES:
        parts = [_literals(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis]
        if not parts or any(part is None for part in parts):
            return None
        return set().union(*parts)  # type: ignore[arg-type]
    return None


_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable)


def _function_of(path: Any) -> Any:
    """The user's function under LangGraph's wrapper of a branch path."""
    for attribute in ("func", "afunc"):
        function = getattr(path, attribute, None)
        if function is not None:
            return function
    return path


def loop_edges(edges: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges on a cycle: (a, b) is when a can be reached again from b."""
    successors: dict[str, set[str]] = {}
    for source, target in edges:
        successors.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, frontier = {start}, [start]
        while frontier:
            node = frontier.pop()
            if node == goal:
                return True
            for nxt in successors.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return False

    return {(s, t) for s, t in dict.fromkeys(edges) if reaches(t, s)}
