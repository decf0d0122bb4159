"""Where a model or tool call stands: which registered graph, thread and node it runs in.

LangGraph runs each node with a config whose metadata names the node (`langgraph_node`) and the
thread (`thread_id`, copied from `configurable`); `register` adds the kvrt graph id to that
metadata and its `KvrtCallbacks` to the callbacks. A call reads both from its callback manager
(models) or from the run config (code in a node): metadata says which graph, the callbacks hold
that graph's binding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackManager

if TYPE_CHECKING:
    from kvrt.sdk.langgraph.binding import KvrtCallbacks

SEP = "/"  # a subgraph's node and its inner node, in an agent name (see declare.py)
GRAPH_ID_KEY = "kvrt_graph_id"  # in the run config's metadata, set by `register`
_MAX_KEY = 128  # the daemon's limit on a run key


@dataclass(frozen=True, slots=True)
class NodeCall:
    binding: KvrtCallbacks
    thread: str  # the run key
    agent: str


def handlers_of(callbacks: Any) -> list[Any]:
    """The handlers of a config's `callbacks` (a list, a callback manager, or None)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, BaseCallbackManager):
        return list(callbacks.handlers)
    return list(callbacks)


def binding_in(metadata: Mapping[str, Any] | None, handlers: Iterable[Any]
               ) -> KvrtCallbacks | None:
    """The binding of the registered graph the metadata names, if its handler is present."""
    from kvrt.sdk.langgraph.binding import KvrtCallbacks

    graph_id = (metadata or {}).get(GRAPH_ID_KEY)
    if graph_id is None:
        return None
    return next((h for h in handlers
                 if isinstance(h, KvrtCallbacks) and h.graph.id == graph_id), None)


def in_config(config: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, list[Any]]:
    """A run config's metadata and callback handlers: what `binding_in` and `locate` read."""
    return config.get("metadata"), handlers_of(config.get("callbacks"))


def locate(metadata: Mapping[str, Any] | None, handlers: Iterable[Any]) -> NodeCall | None:
    """The registered graph, thread and agent of a call; None outside a registered graph, and
    for a call that cannot be placed (no thread id, or no node that is an agent), which then
    goes unattributed (the binding warns once)."""
    binding = binding_in(metadata, handlers)
    if binding is None or metadata is None:
        return None
    thread = metadata.get("thread_id")
    agent = agent_of(metadata, binding.agents)
    if thread is None or agent is None:
        binding.unplaced(metadata, thread is None)
        return None
    return NodeCall(binding, run_key(thread), agent)


def agent_of(metadata: Mapping[str, Any], names: AbstractSet[str]) -> str | None:
    """The agent a call belongs to: its node, qualified by the subgraphs it runs in (the
    checkpoint namespace `outer:task|inner:task` names `outer/inner`), else the innermost
    enclosing node that is an agent (a graph invoked inside a node's function is part of it);
    None when no node on the way is one."""
    namespace = metadata.get("langgraph_checkpoint_ns")
    if not namespace:
        node = metadata.get("langgraph_node")
        return node if node in names else None
    parts = [part.split(":", 1)[0] for part in str(namespace).split("|")]
    for depth in range(len(parts), 0, -1):
        name = SEP.join(parts[:depth])
        if name in names:
            return name
    return None


def run_key(thread: Any) -> str:
    """A thread id as a run key; one longer than the daemon takes is hashed (SHA-256)."""
    key = str(thread)
    return key if 0 < len(key) <= _MAX_KEY else hashlib.sha256(key.encode()).hexdigest()
