"""Town persona agents talking in All-Gather rounds through the kvrt SDK.

Each round every agent reads its persona, then the round's shared messages (the news, or what
everyone said in the round before), then the instruction, and speaks; what each says becomes one
of the next round's shared messages. Every agent reads the same shared text at a different
position (after its own persona), so prefix caching cannot reuse it. A round's shared messages
are segments, which the daemon's `kvrt` policy computes once per round and reads at every
agent's position; under the other policies the example runs the same, reports no reuse, and
says so first (it asks the daemon's /health which policy it serves with):

    kvrt serve --policy kvrt &
    python examples/town_rounds.py --url http://127.0.0.1:8400 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio

from kvrt.sdk import Client, Graph, RunState

REUSING_POLICY = "kvrt"  # the policy that computes a round's shared text once

PERSONAS = {
    "mara": "You are Mara, the town baker. You are practical and worry about flour deliveries.",
    "tomas": "You are Tomas, the ferryman. You know the river and distrust the county council.",
    "ines": "You are Ines, the mayor. You want everyone to agree and the budget to balance.",
    "ravi": "You are Ravi, the schoolteacher. You think about the children's way to school.",
    "lena": "You are Lena, the doctor. You care about reaching patients on the far bank.",
}

NEWS = ("Town news: the bridge on Mill Road closed this morning after the storm. The county "
        "says repairs take two weeks. The only other crossing is Tomas's ferry, which carries "
        "twelve people at a time.")

INSTRUCTION = [{"role": "user", "content": "In one or two sentences, in character, say what "
                "you think and what you will do next."}]


def build_graph(names: list[str]) -> Graph:
    # No edges: within a round the agents speak at once, none waits on another. The default
    # reuse ("exact") is enough: a round's shared messages are segments whatever the graph says;
    # `reuse="approximate"` would also mark each private persona, which no other prompt holds.
    g = Graph("town")
    for name in names:
        g.agent(name, system=PERSONAS[name], expected_output_tokens=48)
    return g


async def say_what_the_policy_shows(client: Client) -> None:
    """A note when the daemon's policy cannot show the reuse this example is about."""
    policy = (await client.health()).policy
    if policy is not None and policy != REUSING_POLICY:
        print(f"note: this daemon runs the `{policy}` policy, which computes the shared text "
              "for every agent, so no reuse will show below. To see it, restart the daemon "
              f"with:\n    kvrt serve --policy {REUSING_POLICY}")


async def main(url: str, rounds: int = 3, agents: int = 5, max_tokens: int = 48) -> RunState:
    """Plays `rounds` rounds with the first `agents` personas; returns the run's final state."""
    names = list(PERSONAS)[:agents]
    async with Client(url) as client:
        await say_what_the_policy_shows(client)
        graph = await client.create_graph(build_graph(names))
        async with await client.start_run(graph) as run:
            shared = [{"role": "user", "content": NEWS}]
            for _ in range(rounds):
                result = await run.round(shared=shared, agents={name: [] for name in names},
                                         instruction=INSTRUCTION, max_tokens=max_tokens,
                                         temperature=0.0)
                print(f"--- round {result.round} ---")
                for name, said in result.agents.items():
                    print(f"{name}> {said.content.strip()}")
                # All-Gather: everyone's words are the next round's shared text, the same for all.
                shared = [{"role": "user", "content": f"{name}: {said.content}"}
                          for name, said in result.agents.items()]

            state = await run.state()
            compression = state.segment_kv_compression  # None: no segment seen yet
            print("segment KV compression: "
                  + ("none" if compression is None else f"{compression:.2f}x"))
            for agent in state.agents:
                print(f"{agent.name:>6}: {agent.kv.segment_reused_tokens} of "
                      f"{agent.kv.segment_tokens} shared tokens read in place from "
                      "another agent's copy")
        await client.delete_graph(graph)
    return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", type=int, default=len(PERSONAS),
                        choices=range(2, len(PERSONAS) + 1))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.rounds, args.agents, args.max_tokens))
