"""kvrt.sdk.langgraph: kvrt for a LangGraph application, by swapping its chat model.

    from kvrt.sdk import Client
    from kvrt.sdk.langgraph import KvrtChatModel, close, register, tool_call

    model = KvrtChatModel(base_url="http://127.0.0.1:8400", max_tokens=64, temperature=0)
    # ... nodes call model.invoke / ainvoke / stream / astream / bind_tools as usual
    async with Client("http://127.0.0.1:8400") as client:
        graph = await register(builder.compile(), client, name="research")
        result = await graph.ainvoke(inputs, {"configurable": {"thread_id": "t1"}})
        await close(graph, "t1")  # the thread's run ends and its KV is released

`register` (`register_sync` for apps that never touch asyncio) declares the compiled graph as
a kvrt agent graph: its nodes are the agents, except `ToolNode`s, which hold no KV (edges pass
through them), and a subgraph node's inner nodes are agents `outer/inner` (declare.py). Inside
the registered graph each LangGraph thread is one kvrt run (started on first use): the model's
calls are attributed to their node; a tool run is reported as a tool call of the agent whose
message asked for it (watch.py, binding.py), or of its node, or with `async with
tool_call(...)` in a node; each invocation's end reports its agents done, or waiting on an
interrupt, and the next resumes them (lifecycle.py). Outside a registered graph the model is a
plain OpenAI-compatible chat model. Needs the `langgraph` extra: `pip install
'kvrt[langgraph]'`.
"""

try:
    import langchain_core  # noqa: F401
    import langchain_openai  # noqa: F401
    import langgraph  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("kvrt.sdk.langgraph needs LangGraph and LangChain's OpenAI models: "
                      "pip install 'kvrt[langgraph]'") from exc

from kvrt.sdk.langgraph.binding import KvrtCallbacks
from kvrt.sdk.langgraph.declare import agent_graph
from kvrt.sdk.langgraph.model import KvrtChatModel
from kvrt.sdk.langgraph.register import (
    close,
    close_all,
    close_all_sync,
    close_sync,
    register,
    register_sync,
)
from kvrt.sdk.langgraph.tools import tool_call

__all__ = [
    "KvrtCallbacks",
    "KvrtChatModel",
    "agent_graph",
    "close",
    "close_all",
    "close_all_sync",
    "close_sync",
    "register",
    "register_sync",
    "tool_call",
]
