"""The kvrt agent graph of a compiled LangGraph `StateGraph`: its nodes are the agents, and an
edge goes wherever control can pass from one node to another.

`get_graph()` draws the fixed edges and the conditional edges whose targets LangGraph knows (a
path map, the list given for `Send` fan-outs, a `Literal` return annotation). A conditional
edge without any of those is drawn only to `__end__`, so the targets of such a branch are taken
from the builder: from its function's return annotation when every possibility in it is a
literal name, and otherwise every node. The scheduler needs a superset of the real edges (a
missing edge hides work that is still to come on the critical path; an extra one only widens
it), so where the code does not say, every node is the honest answer.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from langgraph.constants import END, START

from kvrt.sdk.graph import Graph
from kvrt.sdk.protocol.control import Reuse


def agent_graph(
    compiled: Any,
    name: str,
    *,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    expected_iterations: int | None = None,
    reuse: Reuse = "exact",
) -> Graph:
    """The declaration of `compiled` (a CompiledStateGraph). `agents` maps a node to
    `Graph.agent` options (system, tools, expected_output_tokens, importance);
    `expected_iterations`, when given, is set on every edge that lies on a loop."""
    nodes = [node for node in compiled.get_graph().nodes if node not in (START, END)]
    options = dict(agents or {})
    unknown = sorted(set(options) - set(nodes))
    if unknown:
        raise ValueError(f"agents names {unknown}, which are not nodes of the graph {nodes}")
    graph = Graph(name, reuse=reuse)
    for node in nodes:
        graph.agent(node, **options.get(node, {}))
    edges = graph_edges(compiled, nodes)
    looped = loop_edges(edges)
    for source, target in edges:
        iterations = expected_iterations if (source, target) in looped else None
        graph.edge(source, target, expected_iterations=iterations)
    return graph


def graph_edges(compiled: Any, nodes: list[str]) -> list[tuple[str, str]]:
    """Every node-to-node edge, in a stable order (drawn edges first, then branch targets)."""
    known = set(nodes)
    edges = [(e.source, e.target) for e in compiled.get_graph().edges
             if e.source in known and e.target in known]
    for source, branches in compiled.builder.branches.items():
        if source not in known:  # a branch from __start__ leads to the first agents only
            continue
        for branch in branches.values():
            edges += [(source, target) for target in branch_targets(branch, nodes)]
    return list(dict.fromkeys(edges))


def branch_targets(branch: Any, nodes: list[str]) -> list[str]:
    """Where a conditional edge may lead (a BranchSpec: `.path`, `.ends`)."""
    if branch.ends:
        return [target for target in branch.ends.values() if target != END]
    names = annotated_names(_function_of(branch.path))
    if names is None:
        return list(nodes)
    return [node for node in nodes if node in names]


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
