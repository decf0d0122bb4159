"""Coding agents that pause on a slow tool, reported to kvrt through the SDK.

Two workers each fix one bug: they alternate a model call and a test run (a slow tool, simulated
here by a sleep), each test log going back into their conversation; then a reviewer reads both
results. Every test run is reported with `agent.tool_call(...)`, so the daemon knows the agent is
waiting and for how long, and its policy decides what to do with the agent's KV meanwhile (keep
it, or move it to the host tier and bring it back just before the tool returns). The decisions
are made by the graph-aware policies and need a host tier to offload to (the example asks the
daemon's /health, and says first when it cannot show them):

    kvrt serve --policy tokencake --host-cache-memory 2GiB &
    python examples/tool_agents.py --url http://127.0.0.1:8400 --tool-seconds 2
"""

from __future__ import annotations

import argparse
import asyncio

from kvrt.sdk import AgentClient, Client, Graph, RunState

BUGS = {
    "worker_a": "parse_date('2024-02-30') returns March 1st instead of raising ValueError.",
    "worker_b": "cache.get(key) returns stale values after cache.clear() is called.",
}
SYSTEM = "You are a careful software engineer. Answer briefly."
# The policies that decide, at each tool call, where the waiting agent's KV goes.
GRAPH_AWARE = ("tokencake", "kvrt", "kvrt-per-request")


async def run_tests(agent: str, attempt: int, seconds: float) -> str:
    """A stand-in for a slow test suite: the first attempt fails, later ones pass."""
    await asyncio.sleep(seconds)
    if attempt == 0:
        return f"FAILED tests/test_{agent}.py::test_bug - AssertionError (1 failed, 41 passed)"
    return "42 passed"


def build_graph(tool_seconds: float) -> Graph:
    g = Graph("tool-agents")
    for worker in BUGS:
        g.agent(worker, system=SYSTEM, tools={"run_tests": tool_seconds},
                expected_output_tokens=64)
        g.edge(worker, "reviewer")
    g.agent("reviewer", system="You review fixes. Answer in two sentences.")
    return g


async def work(worker: AgentClient, steps: int, tool_seconds: float, max_tokens: int) -> str:
    """The worker's loop: propose a fix, run the tests, read the log; returns its last words."""
    conversation = [{"role": "user", "content": f"Bug: {BUGS[worker.name]} Propose a fix."}]
    for attempt in range(steps):
        reply = await worker.chat(conversation, max_tokens=max_tokens, temperature=0.0)
        print(f"{worker.name}> {reply.content.strip()}")
        async with worker.tool_call("run_tests", expected_duration_s=tool_seconds):
            log = await run_tests(worker.name, attempt, tool_seconds)
        print(f"{worker.name} ran the tests: {log}")
        conversation += [{"role": "assistant", "content": reply.content},
                         {"role": "user", "content": f"Test log: {log}\nWhat next?"}]
    final = await worker.chat(conversation, max_tokens=max_tokens, temperature=0.0)
    await worker.done()
    return final.content


async def say_what_the_policy_shows(client: Client) -> None:
    """A note when the daemon cannot show the KV decisions this example is about."""
    health = await client.health()
    if health.policy is None:
        return  # a daemon that does not say
    if health.policy not in GRAPH_AWARE or not health.host_cache_bytes:
        why = (f"runs the `{health.policy}` policy, which makes no decision at tool calls"
               if health.policy not in GRAPH_AWARE else "has no host tier to offload to")
        print(f"note: this daemon {why}: what a policy does with a waiting agent's KV will not "
              "show below. To see it, restart the daemon with:\n"
              "    kvrt serve --policy tokencake --host-cache-memory 2GiB")


async def main(url: str, steps: int = 2, tool_seconds: float = 1.0,
               max_tokens: int = 48) -> RunState:
    """Runs both workers concurrently, then the reviewer; returns the run's final state."""
    async with Client(url) as client:
        await say_what_the_policy_shows(client)
        graph = await client.create_graph(build_graph(tool_seconds))
        async with await client.start_run(graph) as run:
            results = await asyncio.gather(*(
                work(run.agent(name), steps, tool_seconds, max_tokens) for name in BUGS))
            fixes = "\n".join(f"{name}: {text}" for name, text in zip(BUGS, results))
            review = await run.agent("reviewer").chat(
                [{"role": "user", "content": f"Review these fixes:\n{fixes}"}],
                max_tokens=max_tokens, temperature=0.0)
            await run.agent("reviewer").done()
            print(f"reviewer> {review.content.strip()}")

            state = await run.state()
            print("KV decisions at the last tool call:")
            for agent in state.agents:
                print(f"{agent.name:>9}: {agent.kv.decision or 'none'}")
            for tool in state.tools:
                print(f"{tool.agent} {tool.tool}: {tool.observations} calls, "
                      f"estimate {tool.estimate_seconds:.2f} s")
        await client.delete_graph(graph)
    return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    parser.add_argument("--steps", type=int, default=2, help="test runs per worker")
    parser.add_argument("--tool-seconds", type=float, default=1.0, help="one test run's time")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.steps, args.tool_seconds, args.max_tokens))
