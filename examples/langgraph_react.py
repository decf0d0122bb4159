"""A ReAct agent written the way LangGraph teaches it (`ToolNode`, `tools_condition`), on kvrt.

The agent node calls the model; when the model asks for a tool, `ToolNode` runs it and the
agent reads the result. kvrt credits each tool run to the agent that asked for it, so while the
slow search runs the agent's KV may leave the device and come back for the predicted return;
at the end of the invocation the adapter reports the agent done. With the default model
(SmolLM2-135M, which answers in prose) the agent answers without calling the tool; a model that
calls tools (Qwen2.5-Instruct, `kvrt serve --model ... --tool-call-parser hermes`) runs it.

    kvrt serve &
    python examples/langgraph_react.py --url http://127.0.0.1:8400
"""

import argparse
import asyncio

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from kvrt.sdk import Client
from kvrt.sdk.langgraph import KvrtChatModel, close, register


@tool
async def search(query: str) -> str:
    """Searches the web for the query."""
    await asyncio.sleep(2.0)  # a slow tool: the agent's KV may wait on the host meanwhile
    return f"kvrt is a KV-cache runtime for multi-agent LLM applications ({query})."


async def main(url: str) -> None:
    model = KvrtChatModel(base_url=url, max_tokens=48, temperature=0).bind_tools([search])

    async def agent(state: MessagesState) -> dict:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")

    async with Client(url) as client:
        # `tools` runs tools and holds no KV: the agent is `agent`, with the search's 2 s.
        graph = await register(builder.compile(), client, name="react",
                               agents={"tools": {"tools": {"search": 2.0}}})
        thread = {"configurable": {"thread_id": "t1"}}
        result = await graph.ainvoke({"messages": [("user", "What is kvrt?")]}, thread)
        print("answer>", result["messages"][-1].content)
        [info] = await client.list_runs(key="t1")
        state = await (await client.get_run(info.id)).state()
        for a in state.agents:
            print(f"{a.name}: {a.state}, {a.calls} model calls, {a.tool_calls} tool calls, "
                  f"KV {a.kv.device_blocks} blocks on the device, {a.kv.host_blocks} on the host")
        await close(graph, "t1")  # the thread's run ends; its KV is released


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    asyncio.run(main(parser.parse_args().url))
