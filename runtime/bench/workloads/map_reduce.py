"""`map-reduce`: M mappers over one long shared document, then a reducer.

Every mapper's prompt starts with the same document (exact prefix reuse: computed once while
it stays cached), then its own question; the reducer combines the mappers' answers.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text
from kvrt.sdk import Graph


@dataclass(frozen=True, slots=True)
class MapReduceParams:
    agents: int = 8  # mappers
    runs: int = 1
    document_words: int = 700
    min_output_tokens: int = 32
    max_output_tokens: int = 96
    seed: int = 0

    @property
    def concurrent_agents(self) -> int:
        return (self.agents + 1) * self.runs


class MapReduce:
    name = "map-reduce"

    def __init__(self, params: MapReduceParams) -> None:
        self.params = params
        rng = random.Random(params.seed)
        self.document = text.words(rng, params.document_words)
        self.questions = [text.words(rng, 12) for _ in range(params.agents)]
        self.lengths = [[rng.randint(params.min_output_tokens, params.max_output_tokens)
                         for _ in range(params.agents + 1)] for _ in range(params.runs)]

    def graph(self) -> Graph:
        graph = Graph(self.name)
        mean = (self.params.min_output_tokens + self.params.max_output_tokens) // 2
        graph.agent("reducer", expected_output_tokens=mean)
        for i in range(self.params.agents):
            graph.agent(f"mapper{i}", expected_output_tokens=mean).edge(f"mapper{i}", "reducer")
        return graph

    async def run(self, session: BenchSession) -> None:
        info = await session.client.create_graph(self.graph())
        await asyncio.gather(*(self._run(session, info, k) for k in range(self.params.runs)))
        await session.client.delete_graph(info)

    async def _run(self, session: BenchSession, info, k: int) -> None:
        job, lengths = f"run {k + 1}", self.lengths[k]
        async with session.job(job), await session.client.start_run(info) as run:
            answers = await asyncio.gather(*(
                session.chat(run.agent(f"mapper{i}"), [{"role": "user", "content":
                             f"Document:\n{self.document}\n\nQuestion: {question}"}],
                             lengths[i], job)
                for i, question in enumerate(self.questions)))
            combined = "\n".join(f"Answer {i + 1}: {a}" for i, a in enumerate(answers))
            await session.chat(run.agent("reducer"), [{"role": "user", "content":
                               f"Combine these answers into one:\n{combined}"}], lengths[-1], job)
