"""What a workload sees: the SDK client, and calls, tools and jobs that record their timing.

Workloads are written against this class only, as applications are written against the SDK:
every model call is a streamed chat completion attributed to its run's agent (so time to first
token is measured where a user would see it), every tool call is reported with tool_call
events and takes its (time-scaled) duration, and a job (a run, a round) is a timed block.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from kvrt.sdk import AgentClient, Client


@dataclass(frozen=True, slots=True)
class CallRecord:
    job: str
    agent: str
    submitted: float  # clock seconds
    first_token: float
    finished: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class JobRecord:
    name: str
    started: float
    finished: float


class BenchSession:
    def __init__(self, client: Client, time_scale: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.client = client
        self.time_scale = time_scale
        self.clock = clock
        self.calls: list[CallRecord] = []
        self.jobs: list[JobRecord] = []

    async def chat(self, agent: AgentClient, messages: Sequence[dict[str, Any]],
                   max_tokens: int, job: str) -> str:
        """One greedy call of exactly `max_tokens` tokens (EOS ignored, so work is fixed)."""
        submitted = self.clock()
        first = None
        async with agent.stream(messages, max_tokens=max_tokens, temperature=0,
                                ignore_eos=True) as stream:
            async for _ in stream:
                if first is None:
                    first = self.clock()
        finished = self.clock()
        usage = stream.usage
        assert usage is not None, "the daemon sends usage with every stream"
        self.record(CallRecord(
            job=job, agent=agent.name, submitted=submitted,
            first_token=finished if first is None else first, finished=finished,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens))
        return stream.text

    def record(self, call: CallRecord) -> None:
        """Records a call made by other means than `chat` (a LangChain chat model inside a
        LangGraph node, say), timed with `clock`: streamed, attributed, of a fixed length."""
        self.calls.append(call)

    async def tool(self, agent: AgentClient, tool: str, seconds: float) -> None:
        """A tool call of `seconds` (before time scaling), reported to the daemon. Like most
        applications, it does not tell the daemon how long the call will take: the daemon
        predicts it from the graph's declaration and the calls it has seen."""
        async with agent.tool_call(tool):
            await asyncio.sleep(seconds * self.time_scale)

    @asynccontextmanager
    async def job(self, name: str) -> AsyncIterator[None]:
        started = self.clock()
        yield
        self.jobs.append(JobRecord(name, started, self.clock()))
