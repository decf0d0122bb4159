"""`register`: declares a compiled LangGraph graph on the daemon and binds it to kvrt; `close`
ends a thread's run. `register_sync`, `close_sync` and `close_all_sync` are their twins for
applications without an event loop (a sync `graph.invoke`): they make blocking calls only.

The graph `register` returns is the compiled graph with two additions to its config: the kvrt
graph id in the metadata (every node's calls carry it) and a callback manager holding the
binding (`KvrtCallbacks`, its `GraphWatch`, both inherited by every run inside the graph) and
its `Lifecycle` (the root run's alone: not inherited). It is still a CompiledStateGraph:
invoke, ainvoke, stream and astream work as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import CallbackManager

from kvrt.sdk import sync
from kvrt.sdk.client import Client
from kvrt.sdk.langgraph.binding import KvrtCallbacks
from kvrt.sdk.langgraph.context import GRAPH_ID_KEY, binding_in, in_config, run_key
from kvrt.sdk.langgraph.declare import agent_graph
from kvrt.sdk.langgraph.threads import SyncHttp
from kvrt.sdk.protocol.control import GraphInfo, GraphSpec, Reuse, RunClosed


async def register(
    compiled: Any,
    client: Client,
    name: str | None = None,
    *,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    expected_iterations: int | None = None,
    reuse: Reuse = "exact",
) -> Any:
    """Declares `compiled` (a CompiledStateGraph) as an agent graph named `name` (default: the
    graph's name) and returns it bound to kvrt. `agents` maps nodes to `Graph.agent` options
    (system, tools, expected_output_tokens, importance); `expected_iterations` is how often its
    loops are expected to run.

    A graph already declared identically on the daemon (the same compiled graph registered
    again, here or by another process) is reused, not declared twice; so is a graph this
    function returned before, for the same daemon.
    """
    bound = binding_of(compiled)
    if bound is not None and bound.base_url == client.base_url:
        return compiled
    spec = agent_graph(compiled, name or compiled.get_name(), agents=agents,
                       expected_iterations=expected_iterations, reuse=reuse).spec()
    info = await declared(client, spec) or await client.create_graph(spec)
    return bound_graph(compiled, KvrtCallbacks(client, info))


def register_sync(
    compiled: Any,
    daemon: str | sync.Client,
    name: str | None = None,
    *,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    expected_iterations: int | None = None,
    reuse: Reuse = "exact",
    api_key: str | None = None,
) -> Any:
    """`register` for code without an event loop: `daemon` is the daemon's URL (with
    `api_key` if it has keys) or a `kvrt.sdk.sync.Client`. The graph it returns reports over
    blocking HTTP from `invoke` and `stream`; `ainvoke` works too."""
    client = (Client(daemon, api_key=api_key) if isinstance(daemon, str)
              else Client(daemon.base_url, headers=daemon.headers))
    bound = binding_of(compiled)
    if bound is not None and bound.base_url == client.base_url:
        return compiled
    spec = agent_graph(compiled, name or compiled.get_name(), agents=agents,
                       expected_iterations=expected_iterations, reuse=reuse).spec()
    http = SyncHttp(client.base_url, client.headers)
    return bound_graph(compiled, KvrtCallbacks(client, http.declared(spec, _same), http))


def bound_graph(compiled: Any, binding: KvrtCallbacks) -> Any:
    callbacks = CallbackManager(handlers=[binding.lifecycle, binding, binding.watch],
                                inheritable_handlers=[binding, binding.watch])
    return compiled.with_config(metadata={GRAPH_ID_KEY: binding.graph.id}, callbacks=callbacks)


async def close(graph: Any, thread_id: Any) -> RunClosed | None:
    """Ends the run of thread `thread_id` of a registered graph (None if it has no live run):
    its KV is released. A later call in the thread starts a new run."""
    binding, thread = _binding(graph), run_key(thread_id)
    binding.lifecycle.forget(thread)
    return await binding.runs.close(thread)


def close_sync(graph: Any, thread_id: Any) -> RunClosed | None:
    """`close` for code without an event loop."""
    binding, thread = _binding(graph), run_key(thread_id)
    binding.lifecycle.forget(thread)
    return binding.runs.close_sync(thread)


async def close_all(graph: Any) -> list[RunClosed]:
    """Ends the runs of every thread this registration has seen."""
    runs = _binding(graph).runs
    closed = [await close(graph, thread) for thread in runs.threads()]
    runs.close_http()
    return [c for c in closed if c is not None]


def close_all_sync(graph: Any) -> list[RunClosed]:
    """`close_all` for code without an event loop."""
    runs = _binding(graph).runs
    closed = [close_sync(graph, thread) for thread in runs.threads()]
    runs.close_http()
    return [c for c in closed if c is not None]


def binding_of(graph: Any) -> KvrtCallbacks | None:
    """The binding `register` put in a graph's config, if any."""
    return binding_in(*in_config(getattr(graph, "config", None) or {}))


async def declared(client: Client, spec: GraphSpec) -> GraphInfo | None:
    """A graph on the daemon declared as `spec` would declare it, if there is one."""
    return next((info for info in await client.list_graphs() if _same(spec, info)), None)


def _same(spec: GraphSpec, info: GraphInfo) -> bool:
    if (spec.name, spec.reuse) != (info.name, info.reuse) or len(spec.agents) != len(info.agents):
        return False
    for want, have in zip(spec.agents, info.agents):
        if (want.name, want.system, want.tools, want.importance) != (
                have.name, have.system, have.tools, have.importance):
            return False
        if want.expected_output_tokens not in (None, have.expected_output_tokens):
            return False
    want_edges = {_edge(e): _iterations(e) for e in spec.edges}
    have_edges = {(e.source, e.target): e.expected_iterations for e in info.edges}
    return want_edges.keys() == have_edges.keys() and all(
        n is None or have_edges[edge] == n for edge, n in want_edges.items())


def _edge(edge: Any) -> tuple[str, str]:
    return (edge[0], edge[1]) if isinstance(edge, tuple) else (edge.source, edge.target)


def _iterations(edge: Any) -> int | None:
    return None if isinstance(edge, tuple) else edge.expected_iterations


def _binding(graph: Any) -> KvrtCallbacks:
    binding = binding_of(graph)
    if binding is None:
        raise ValueError("this graph was not returned by kvrt.sdk.langgraph.register")
    return binding
