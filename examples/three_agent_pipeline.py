"""A planner -> searcher -> writer pipeline through the kvrt SDK.

The planner writes a search query, the searcher runs a (local, slow-ish) search tool and
summarises what it found, the writer streams the answer. kvrt knows the graph, so it knows that
the searcher waits on its tool for a while and that the writer comes last.

    kvrt serve &
    python examples/three_agent_pipeline.py --url http://127.0.0.1:8400
"""

from __future__ import annotations

import argparse
import asyncio

from kvrt.sdk import Client, Graph, RunState

QUESTION = "Why does a KV cache make LLM decoding faster?"

CORPUS = {
    "kv cache": "A KV cache stores the keys and values of past tokens, so each decode step "
                "computes attention for the new token only.",
    "prefix caching": "Prefix caching reuses the KV cache of a shared prompt prefix across "
                      "requests instead of computing it again.",
    "paged attention": "Paged attention keeps the KV cache in fixed-size blocks, like pages of "
                       "virtual memory, so memory is not wasted on padding.",
    "offloading": "Offloading moves idle KV blocks to host memory and brings them back later.",
}


async def web_search(query: str, limit: int = 2) -> list[str]:
    """A stand-in for a real search API: scores the corpus by shared words, after a delay."""
    await asyncio.sleep(0.3)
    words = set(query.lower().split())

    def overlap(topic: str) -> int:
        return len(words & set(f"{topic} {CORPUS[topic]}".lower().split()))

    return [CORPUS[topic] for topic in sorted(CORPUS, key=overlap, reverse=True)[:limit]]


def build_graph() -> Graph:
    g = Graph("research")
    g.agent("planner", system="You plan research. Answer with one search query.",
            expected_output_tokens=32)
    g.agent("searcher", system="You summarise search results in two sentences.",
            tools={"web_search": 0.3}, expected_output_tokens=96)
    g.agent("writer", system="You write a short, clear answer.", expected_output_tokens=128)
    g.edge("planner", "searcher").edge("searcher", "writer")
    return g


async def main(url: str, max_tokens: int = 64) -> RunState:
    """Runs the pipeline once against the daemon at `url`; returns the run's final state."""
    sampling = {"max_tokens": max_tokens, "temperature": 0.0}
    async with Client(url) as client:
        graph = await client.create_graph(build_graph())
        async with await client.start_run(graph) as run:
            planner, searcher, writer = (run.agent(n) for n in ("planner", "searcher", "writer"))

            plan = await planner.chat([{"role": "user", "content": QUESTION}], **sampling)
            await planner.done()
            print(f"planner> {plan.content}")

            async with searcher.tool_call("web_search", expected_duration_s=0.3):
                results = await web_search(f"{QUESTION} {plan.content}")
            found = "\n".join(f"- {r}" for r in results)
            summary = await searcher.chat(
                [{"role": "user", "content": f"Results:\n{found}\nSummarise them."}], **sampling
            )
            await searcher.done()
            print(f"searcher> {summary.content}")

            print("writer> ", end="", flush=True)
            answer = writer.stream(
                [{"role": "user", "content": f"{QUESTION}\nNotes: {summary.content}"}], **sampling
            )
            async for delta in answer:
                print(delta, end="", flush=True)
            await writer.done()
            print(f"\n({answer.usage.completion_tokens if answer.usage else 0} tokens)")

            state = await run.state()
            for agent in state.agents:
                print(f"{agent.name:>8}: {agent.state:<9} generated {agent.generated_tokens:>3} "
                      f"tokens, priority {agent.priority:.2f}, "
                      f"{agent.kv.device_blocks} KV blocks ({agent.kv.shared_blocks} shared)")
        await client.delete_graph(graph)
    return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.max_tokens))
