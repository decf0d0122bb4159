"""`langgraph`: real LangGraph applications driven through kvrt's adapter, several threads each.

Three applications, as LangGraph's documentation teaches them (graphs in `langgraph_graphs`):
- `react`: an `agent` node calling the model, `ToolNode(tools)` and `tools_condition`; each
  thread takes `turns` tool turns, then answers;
- `supervisor`: a supervisor routing to specialists (researcher, coder, writer) by a router
  function with no annotation and no path map, so kvrt declares that it may lead to every node;
  each specialist calls the model, then maybe a slow tool, and hands back; `routes` routes a
  thread, then END;
- `approval`: a node drafts, the next one `interrupt()`s for a human's approval (the workload
  resumes the thread with `Command(resume=...)` after the human's delay), a last one finishes.

Every model call is real: streamed from the daemon through `KvrtChatModel`, of the planned
length with EOS ignored (as `BenchSession.chat`). The small models cannot emit tool calls
reliably, so the plan's tool call is attached to the message the model returned. Tools are
`@tool` coroutines that sleep their planned, time-scaled duration (log-normal, as in
`tool-agents`) and return `tool_output_words` of planned text, so the next prompt grows. All of
it is drawn from the seed in advance: every policy sees the same plan. A thread is a job; at its
end its run is closed (`close`), which releases its KV.

With `--param` values matching `tool-agents`' (threads=runs, turns, tool times, system and tool
output words, output lengths), the two workloads compare the graph-aware gain of the SDK-driven
and the LangGraph-driven forms (docs/benchmarks/langgraph.md).
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text

_Z95 = 1.6449  # the standard normal's 95th percentile
SPECIALISTS = ("researcher", "coder", "writer")
APPS = ("react", "supervisor", "approval")


@dataclass(frozen=True, slots=True)
class LangGraphParams:
    threads: int = 4  # concurrent threads of each application
    turns: int = 2  # tool turns of a ReAct thread
    routes: int = 2  # specialists a supervisor thread routes to before END
    specialist_tool_share: float = 0.5  # of specialist visits that run a tool
    tool_median_s: float = 2.0
    tool_p95_s: float = 10.0
    human_median_s: float = 5.0  # the approval's delay
    human_p95_s: float = 20.0
    system_words: int = 250
    tool_output_words: int = 30
    min_output_tokens: int = 32
    max_output_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("threads", "min_output_tokens", "system_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("turns", "routes", "tool_output_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.max_output_tokens < self.min_output_tokens:
            raise ValueError("max_output_tokens must be at least min_output_tokens")
        if not 0 <= self.specialist_tool_share <= 1:
            raise ValueError("specialist_tool_share must be within [0, 1]")
        for kind in ("tool", "human"):
            median, p95 = getattr(self, f"{kind}_median_s"), getattr(self, f"{kind}_p95_s")
            if not 0 < median <= p95:
                raise ValueError(f"need 0 < {kind}_median_s <= {kind}_p95_s, "
                                 f"not {median} and {p95}")

    @property
    def concurrent_agents(self) -> int:
        """Nodes of all three graphs, per thread: agent and tools, supervisor and the
        specialists, draft, approve and final."""
        return self.threads * (2 + 1 + len(SPECIALISTS) + 3)

    def calls_per_thread(self, app: str) -> int:
        return {"react": self.turns + 1, "supervisor": 2 * self.routes + 1, "approval": 2}[app]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    seconds: float  # before time scaling
    output: str


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    app: str
    thread: str  # the LangGraph thread id, and the job's name
    task: str
    lengths: list[int]  # output tokens of each model call, in order
    tools: list[ToolPlan | None]  # react: per turn; supervisor: per route (None: no tool)
    route: list[str]  # supervisor: the specialists, in order
    human_s: float  # approval: the human's delay, before time scaling

    def ticket(self, n: int) -> str:
        """The argument of the thread's n-th planned tool call: the tool finds its plan by it."""
        return f"{self.thread}/{n}"


def _lognormal(rng: random.Random, median: float, p95: float) -> float:
    return rng.lognormvariate(math.log(median), math.log(p95 / median) / _Z95)


class LangGraphApps:
    name = "langgraph"

    def __init__(self, params: LangGraphParams) -> None:
        self.params = params
        p, rng = params, random.Random(params.seed)
        self.system = ("You are part of a team of software agents. Follow the house rules: "
                       + text.words(rng, p.system_words))
        self.plans: list[ThreadPlan] = []
        for app in APPS:
            for k in range(p.threads):
                tools = self._tools(rng, app)
                self.plans.append(ThreadPlan(
                    app=app, thread=f"{app} {k + 1}", task=text.words(rng, 40),
                    lengths=[rng.randint(p.min_output_tokens, p.max_output_tokens)
                             for _ in range(p.calls_per_thread(app))],
                    tools=tools,
                    route=[rng.choice(SPECIALISTS) for _ in range(p.routes)]
                    if app == "supervisor" else [],
                    human_s=_lognormal(rng, p.human_median_s, p.human_p95_s)))

    def _tools(self, rng: random.Random, app: str) -> list[ToolPlan | None]:
        p = self.params
        if app == "react":
            return [self._tool(rng) for _ in range(p.turns)]
        if app == "supervisor":
            return [self._tool(rng) if rng.random() < p.specialist_tool_share else None
                    for _ in range(p.routes)]
        return []

    def _tool(self, rng: random.Random) -> ToolPlan:
        p = self.params
        return ToolPlan(_lognormal(rng, p.tool_median_s, p.tool_p95_s),
                        text.words(rng, p.tool_output_words))

    async def run(self, session: BenchSession) -> None:
        from kvrt.runtime.bench.workloads.langgraph_graphs import Apps  # the `langgraph` extra

        apps = await Apps.start(self, session)
        try:
            await asyncio.gather(*(apps.play(plan) for plan in self.plans))
        finally:
            await apps.stop()
