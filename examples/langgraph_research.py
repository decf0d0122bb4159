"""A LangGraph research graph on kvrt: a planner, parallel researchers with a search tool, a writer.

The graph is plain LangGraph (a `StateGraph`, `Send` for the fan-out, a LangChain `@tool`). Two
things make it a kvrt application: its chat model is `KvrtChatModel`, which attributes every call
to the node that makes it, and `register` declares the graph's nodes and edges to the daemon and
ties each thread to a run, so the daemon knows who waits on a tool and who comes last. The
three researchers run in parallel as instances of one node, so they are one agent to kvrt. Needs
the adapter's extra (`pip install 'kvrt[langgraph]'`):

    kvrt serve &
    python examples/langgraph_research.py --url http://127.0.0.1:8400
"""

from __future__ import annotations

import argparse
import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from kvrt.sdk import Client
from kvrt.sdk.langgraph import KvrtChatModel, close, register

QUESTION = "Why does a KV cache make serving many LLM agents cheaper?"

CORPUS = {
    "kv cache": "A KV cache stores the keys and values of past tokens, so each decode step "
                "computes attention for the new token only.",
    "prefix caching": "Prefix caching reuses the KV cache of a shared prompt prefix across "
                      "requests instead of computing it again.",
    "paged attention": "Paged attention keeps the KV cache in fixed-size blocks, so memory is "
                       "not wasted on padding and blocks can be shared between requests.",
    "offloading": "Offloading moves the KV cache of an agent that waits on a tool to host "
                  "memory and brings it back before the agent needs it.",
}


class Research(TypedDict, total=False):
    question: str
    researchers: int
    topics: list[str]
    notes: Annotated[list[str], operator.add]  # one per researcher, gathered from the fan-out
    answer: str


class Assignment(TypedDict):
    question: str
    topic: str


def make_search(seconds: float) -> BaseTool:
    @tool
    async def search(topic: str) -> str:
        """Looks a topic up (a stand-in for a web search API: a local corpus, after a delay)."""
        await asyncio.sleep(seconds)
        return CORPUS[topic]

    return search


def build_graph(model: KvrtChatModel, search: BaseTool) -> StateGraph:
    async def planner(state: Research) -> Research:
        plan = await model.ainvoke([SystemMessage("You plan research. List the topics to look "
                                                  "up, one per line."),
                                    HumanMessage(state["question"])])
        # The model's plan ranks the topics we can look up: those it shares most words with.
        words = set(f"{state['question']} {plan.content}".lower().split())
        ranked = sorted(CORPUS, key=lambda t: len(words & set(t.split())), reverse=True)
        return {"topics": ranked[:state["researchers"]]}

    def fan_out(state: Research) -> list[Send]:
        return [Send("researcher", {"question": state["question"], "topic": topic})
                for topic in state["topics"]]

    async def researcher(task: Assignment, config: RunnableConfig) -> Research:
        found = await search.ainvoke({"topic": task["topic"]}, config)
        note = await model.ainvoke([SystemMessage("You summarise a source in one sentence."),
                                    HumanMessage(f"Question: {task['question']}\n"
                                                 f"Source: {found}")], config)
        return {"notes": [f"{task['topic']}: {note.content}"]}

    async def writer(state: Research) -> Research:
        notes = "\n".join(f"- {note}" for note in state["notes"])
        answer = await model.ainvoke([SystemMessage("You write a short, clear answer."),
                                      HumanMessage(f"{state['question']}\nNotes:\n{notes}")])
        return {"answer": str(answer.content)}

    builder = StateGraph(Research)
    builder.add_node("planner", planner)
    builder.add_node("researcher", researcher)
    builder.add_node("writer", writer)
    builder.add_edge(START, "planner")
    builder.add_conditional_edges("planner", fan_out, ["researcher"])
    builder.add_edge("researcher", "writer")
    builder.add_edge("writer", END)
    return builder


async def main(url: str, researchers: int = 3, search_seconds: float = 0.5,
               max_tokens: int = 48, thread: str = "t1") -> dict[str, Any]:
    """Answers QUESTION once on thread `thread`; returns the graph's final state."""
    model = KvrtChatModel(base_url=url, max_tokens=max_tokens, temperature=0)
    builder = build_graph(model, make_search(search_seconds))
    async with Client(url) as client:
        # Declared tool times let the daemon plan around a researcher's search from the start.
        graph = await register(builder.compile(), client, name="research",
                               agents={"researcher": {"tools": {"search": search_seconds}}})
        result = await graph.ainvoke({"question": QUESTION, "researchers": researchers},
                                     {"configurable": {"thread_id": thread}})
        print(f"planner> topics: {', '.join(result['topics'])}")
        for note in result["notes"]:
            print(f"researcher> {note}")
        print(f"writer> {result['answer']}")

        # The thread is one run on the daemon, its key the thread id; each node is an agent.
        for info in await client.list_runs(key=thread):
            state = await (await client.get_run(info.id)).state()
            print(f"run {state.id} of thread {state.key}:")
            for agent in state.agents:
                print(f"{agent.name:>10}: {agent.calls} model calls, {agent.tool_calls} tool "
                      f"calls, {agent.generated_tokens} tokens generated")
        # Done with the thread: its run ends and the daemon frees its KV. The declared graph
        # stays, and the next `register` of the same graph finds it.
        await close(graph, thread)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    parser.add_argument("--researchers", type=int, default=3, choices=range(1, len(CORPUS) + 1))
    parser.add_argument("--search-seconds", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--thread", default="t1")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.researchers, args.search_seconds, args.max_tokens,
                     args.thread))
