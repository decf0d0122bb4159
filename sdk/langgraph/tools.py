"""`tool_call`: reports tool work written directly in a node, as `AgentClient.tool_call` does.

    async def search(state):
        async with tool_call("web_search", expected_s=2.0):
            hits = await my_search(state["query"])

The node, thread and graph come from the LangGraph run config (Python 3.11+ hands it to async
nodes by context; on 3.10 pass the node's `config`). Outside a registered graph, or in a node
that cannot be placed, the block just runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

from kvrt.sdk.errors import KvrtError
from kvrt.sdk.langgraph.context import in_config, locate
from kvrt.sdk.langgraph.threads import ENDED_CODES
from kvrt.sdk.protocol.control import EventAck


@asynccontextmanager
async def tool_call(name: str, expected_s: float | None = None, *,
                    config: RunnableConfig | None = None) -> AsyncIterator[EventAck | None]:
    """Sends tool_call.started on entry and tool_call.finished on exit, also when the block
    raises (its exception propagates unchanged). `expected_s` is the caller's estimate of the
    call's seconds. Yields the daemon's acknowledgement of the start (None when not sent)."""
    call = locate(*in_config(ensure_config(config)))
    if call is None:
        yield None
        return
    call.binding.lifecycle.saw(call.thread, call.agent)
    run = await call.binding.runs.run(call.thread)
    async with AsyncExitStack() as stack:
        try:
            ack = await stack.enter_async_context(run.agent(call.agent).tool_call(name, expected_s))
        except KvrtError as exc:  # the daemon ended the thread's run by itself: a new one
            if exc.code not in ENDED_CODES:
                raise
            call.binding.runs.forget(call.thread, run.id)
            run = await call.binding.runs.run(call.thread)
            ack = await stack.enter_async_context(run.agent(call.agent).tool_call(name, expected_s))
        yield ack
