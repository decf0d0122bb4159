"""`GraphWatch`: what the adapter must remember from a registered graph's callbacks, kept
without I/O: which agent asked for each tool call, and which agents an interrupt stopped.

LangGraph sends every chain and model event of every node to every handler. This one runs
inline (`run_inline`: on the caller's thread or loop, no worker-thread hop) and does dict
updates only, after a cheap test that drops the many events it has no use for:

    event                                   kept
    --------------------------------------  --------------------------------------------------
    on_chat_model_start (any chat model)    model run -> (thread, agent)
    on_llm_end                              (thread, tool call id) -> agent, for each tool
                                            call in the generated AIMessages
    on_chain_start of a node's own run      node run -> (thread, agent)
    on_chain_end of a node's own run        as on_llm_end, for AIMessages in its output (a
                                            node may build the message itself)
    on_chain_error, a GraphInterrupt        the agent, as interrupted in its thread

A ToolNode runs the tools an AIMessage asks for and passes each call's id to on_tool_start
(`tool_call_id`): the agent whose model produced that message is the one whose KV idles during
the tool, so the tool call is reported as its (binding.py). The producing model need not be
`KvrtChatModel`. Every map is bounded: an entry that its end never removes (a cancelled run)
cannot make it grow without limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langgraph.errors import GraphInterrupt

from kvrt.sdk.langgraph.context import GRAPH_ID_KEY, agent_of, run_key

_REMEMBERED = 4096  # per map: tool calls asked for and not yet run, runs in flight


class GraphWatch(BaseCallbackHandler):
    run_inline = True
    ignore_agent = True  # tool events: KvrtCallbacks reports them
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, graph_id: str, agents: frozenset[str]) -> None:
        self.graph_id = graph_id
        self.agents = agents
        self._models: OrderedDict[UUID, tuple[str, str]] = OrderedDict()
        self._nodes: OrderedDict[UUID, tuple[str, str]] = OrderedDict()
        self._producers: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._interrupted: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # sync graphs call handlers from worker threads

    # ---- what the binding asks --------------------------------------------------------------

    def producer(self, thread: str, tool_call_id: str) -> str | None:
        """The agent whose model call asked for this tool call, if one in the thread did."""
        with self._lock:
            return self._producers.pop((thread, tool_call_id), None)

    def take_interrupted(self, thread: str) -> set[str]:
        """The agents an interrupt stopped in the thread's invocation that just ended."""
        with self._lock:
            return self._interrupted.pop(thread, set())

    # ---- callbacks --------------------------------------------------------------------------

    def on_chat_model_start(self, serialized: dict[str, Any], messages: Any, *, run_id: UUID,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        placed = self._place(metadata)
        if placed is not None:
            self._remember(self._models, run_id, placed)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        placed = self._models.pop(run_id, None)
        if placed is None:
            return
        self._asked(placed, [getattr(getattr(generation, "message", None), "tool_calls", ())
                             for generations in response.generations
                             for generation in generations])

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._models.pop(run_id, None)

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # A node's own run is named after it; the runnables inside it are not.
        if metadata is None or kwargs.get("name") != metadata.get("langgraph_node"):
            return
        placed = self._place(metadata)
        if placed is not None:
            self._remember(self._nodes, run_id, placed)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        placed = self._nodes.pop(run_id, None)
        if placed is not None and isinstance(outputs, dict):
            values = [v for value in outputs.values()
                      for v in (value if isinstance(value, (list, tuple)) else [value])]
            self._asked(placed, [getattr(value, "tool_calls", None) or () for value in values])

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        placed = self._nodes.pop(run_id, None)
        if placed is not None and isinstance(error, GraphInterrupt):
            thread, agent = placed
            with self._lock:
                self._interrupted.setdefault(thread, set()).add(agent)

    # ---- helpers ----------------------------------------------------------------------------

    def _place(self, metadata: Mapping[str, Any] | None) -> tuple[str, str] | None:
        if metadata is None or metadata.get(GRAPH_ID_KEY) != self.graph_id:
            return None
        thread = metadata.get("thread_id")
        agent = agent_of(metadata, self.agents)
        return None if thread is None or agent is None else (run_key(thread), agent)

    def _asked(self, placed: tuple[str, str], tool_calls: list[Any]) -> None:
        """Records the agent as the asker of each of these tool calls (lists of dicts)."""
        thread, agent = placed
        for calls in tool_calls:
            for call in calls:
                if isinstance(call, dict) and call.get("id"):
                    self._remember(self._producers, (thread, call["id"]), agent)

    def _remember(self, kept: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        with self._lock:
            kept[key] = value
            while len(kept) > _REMEMBERED:
                kept.popitem(last=False)
