"""`generative-agents`: persona agents in synchronized rounds (the All-Gather pattern).

Each round every agent sees its private persona and memory (its system prompt), then every
agent's output of the previous round, one message each, in the same order for everyone, then
its instruction. The shared messages are the same text in every prompt but sit after a
different private prefix, so prefix caching cannot reuse them across agents.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text
from kvrt.sdk import AgentClient, Graph


@dataclass(frozen=True, slots=True)
class GenerativeAgentsParams:
    agents: int = 8
    rounds: int = 4
    persona_words: int = 220  # persona and memory: a few hundred tokens
    min_output_tokens: int = 32
    max_output_tokens: int = 96
    seed: int = 0

    @property
    def concurrent_agents(self) -> int:
        return self.agents


class GenerativeAgents:
    name = "generative-agents"

    def __init__(self, params: GenerativeAgentsParams) -> None:
        self.params = params
        rng = random.Random(params.seed)
        self.names = [f"persona{i}" for i in range(params.agents)]
        self.personas = [
            f"You are {text.name(rng)}, who lives in the village. Your memories: "
            f"{text.words(rng, params.persona_words)}" for _ in self.names]
        self.lengths = [[rng.randint(params.min_output_tokens, params.max_output_tokens)
                         for _ in self.names] for _ in range(params.rounds)]

    def graph(self) -> Graph:
        graph = Graph(self.name)
        mean = (self.params.min_output_tokens + self.params.max_output_tokens) // 2
        for name, persona in zip(self.names, self.personas):
            graph.agent(name, system=persona, expected_output_tokens=mean * self.params.rounds)
        for a in self.names:  # everyone hears everyone, round after round: one loop
            for b in self.names:
                if a != b:
                    graph.edge(a, b, expected_iterations=self.params.rounds)
        return graph

    async def run(self, session: BenchSession) -> None:
        info = await session.client.create_graph(self.graph())
        async with await session.client.start_run(info) as run:
            said: list[str] = []
            for r in range(self.params.rounds):
                async with session.job(f"round {r + 1}"):
                    said = list(await asyncio.gather(*(
                        self._turn(session, run.agent(name), r, said, self.lengths[r][i])
                        for i, name in enumerate(self.names))))
            await asyncio.gather(*(run.agent(name).done() for name in self.names))
        await session.client.delete_graph(info)

    async def _turn(self, session: BenchSession, agent: AgentClient, round_: int,
                    said: list[str], max_tokens: int) -> str:
        messages = [{"role": "user", "content": f"Round {round_ + 1}. "
                     + ("Last round:" if said else "Nobody has spoken yet.")}]
        # What everyone said is shared text: marked as segments, reusable at any position by a
        # policy that reuses them (`kvrt`); the others ignore the mark.
        messages += [{"role": "user", "content": f"{speaker}: {words}",
                      "kvrt": {"segment": True}} for speaker, words in zip(self.names, said)]
        messages.append({"role": "user", "content": "Say what you do next, in character."})
        return await session.chat(agent, messages, max_tokens, job=f"round {round_ + 1}")
