"""`KvrtCallbacks`: one registered graph's binding, and the LangChain callback handler that
reports its tool runs.

`register` puts one in the compiled graph's callbacks, with its two helpers: `watch` (an
inline handler that remembers who asked for each tool call and which nodes an interrupt
stopped, watch.py) and `lifecycle` (the root run's handler: done, waiting, resumed,
lifecycle.py). Models and `tool_call` find the binding there (see context.py) for the graph's
declaration and its runs by thread; as a handler it turns the tool runs LangChain reports (a
`@tool` invoked in a node, `ToolNode`) into tool-call events. A tool call that carries the id
of a tool call some model in the thread asked for (ToolNode passes it) is the asking agent's:
its KV is what idles meanwhile. Any other is its node's, if the node is an agent. It handles
tool events only: LangGraph sends every chain and model event to every handler, and each would
cost a worker-thread hop for nothing.

The handler is synchronous on purpose: LangChain runs a sync handler on a worker thread from
async code (and waits for it, so a start is sent before the tool runs and before its finish),
and inline from sync code, so one HTTP path serves `ainvoke` and `invoke` graphs alike. A
failure to report is logged by LangChain and never fails the tool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from kvrt.sdk.client import Client
from kvrt.sdk.errors import KvrtError
from kvrt.sdk.langgraph.context import NodeCall, binding_in, locate, run_key
from kvrt.sdk.langgraph.lifecycle import Lifecycle
from kvrt.sdk.langgraph.threads import ENDED_CODES, SyncHttp, ThreadRuns
from kvrt.sdk.langgraph.watch import GraphWatch
from kvrt.sdk.protocol.control import GraphInfo, ToolCallFinished, ToolCallStarted
from kvrt.sdk.run import Run

log = logging.getLogger(__name__)


class KvrtCallbacks(BaseCallbackHandler):
    ignore_chain = True
    ignore_llm = True
    ignore_chat_model = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True
    # ignore_agent stays False: LangChain files tool events under it.

    def __init__(self, client: Client, graph: GraphInfo, http: SyncHttp | None = None) -> None:
        self.graph = graph
        self.agents = frozenset(agent.name for agent in graph.agents)
        self.runs = ThreadRuns(client, graph, http)
        self.watch = GraphWatch(graph.id, self.agents)
        self.lifecycle = Lifecycle(self.runs, self.watch)
        self._open: dict[UUID, tuple[Run, str, str]] = {}  # tool run id -> (run, agent, tool)
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def base_url(self) -> str:
        return self.runs.client.base_url

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        call = self._asker(metadata, kwargs.get("tool_call_id")) or locate(metadata, [self])
        if call is None:
            return
        tool = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        self.lifecycle.saw(call.thread, call.agent)
        run = self.runs.send_sync(call.thread, ToolCallStarted(agent=call.agent, tool=tool))
        with self._lock:
            self._open[run_id] = (run, call.agent, tool)

    def _asker(self, metadata: Mapping[str, Any] | None, tool_call_id: str | None
               ) -> NodeCall | None:
        """The agent whose model asked for this tool call, if the watch saw it."""
        thread = (metadata or {}).get("thread_id")
        if thread is None or not tool_call_id or binding_in(metadata, [self]) is not self:
            return None
        agent = self.watch.producer(run_key(thread), tool_call_id)
        return None if agent is None else NodeCall(self, run_key(thread), agent)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(run_id)

    def _finish(self, run_id: UUID) -> None:
        with self._lock:
            opened = self._open.pop(run_id, None)
        if opened is not None:
            run, agent, tool = opened
            try:
                self.runs.event_sync(run, ToolCallFinished(agent=agent, tool=tool))
            except KvrtError as exc:  # the run ended while the tool ran: nothing to finish
                if exc.code not in ENDED_CODES:
                    raise

    def unplaced(self, metadata: Mapping[str, Any], no_thread: bool) -> None:
        """Warns, once per reason, of calls in the graph that go unattributed."""
        reason = ("no thread" if no_thread
                  else f"node {metadata.get('langgraph_node')!r} is not an agent")
        with self._lock:
            if reason in self._warned:
                return
            self._warned.add(reason)
        if no_thread:
            log.warning("graph %s (%s) was invoked without a thread_id: its calls are not "
                        "attributed to a run; pass {'configurable': {'thread_id': ...}}",
                        self.graph.name, self.graph.id)
        else:
            log.warning("graph %s (%s): %s; its calls are not attributed", self.graph.name,
                        self.graph.id, reason)

    def __repr__(self) -> str:
        return f"KvrtCallbacks(graph={self.graph.id!r}, daemon={self.base_url!r})"
