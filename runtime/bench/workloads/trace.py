"""`trace`: replays a recorded workload from a JSONL file, so users can bring their own.

One JSON object per line; `kind` says what it is:

    {"kind": "graph", "run": "r1", "graph": {GraphSpec: name, agents, edges, ...}}   optional
    {"kind": "call", "run": "r1", "agent": "planner", "at": 0.0,
     "messages": [{"role": "user", "content": "..."}], "max_tokens": 64}
    {"kind": "tool", "run": "r1", "agent": "searcher", "at": 2.5, "tool": "web_search",
     "duration_s": 3.1}
    {"kind": "done", "run": "r1", "agent": "planner", "at": 4.0}                       optional

`at` is seconds from the start of the replay. Each (run, agent) replays its lines in file order,
each no earlier than its `at` (times `--time-scale`, like tool durations) and after the agent's
previous line has finished; the agents and runs go concurrently. A run without a `graph` line
gets a graph of the agents it names, without edges. Each run is one job. Outputs are generated
anew (greedy, exact `max_tokens`), so a recorded conversation that quoted earlier answers
replays with the recorded text, not the new one.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kvrt.runtime.bench.session import BenchSession
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec


class _Line(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True):
    run: str


class GraphLine(_Line, tag="graph"):
    graph: GraphSpec


class CallLine(_Line, tag="call"):
    agent: str
    messages: list[dict[str, Any]]
    max_tokens: Annotated[int, Meta(ge=1)]
    at: Annotated[float, Meta(ge=0)] = 0.0


class ToolLine(_Line, tag="tool"):
    agent: str
    tool: str
    duration_s: Annotated[float, Meta(ge=0)]
    at: Annotated[float, Meta(ge=0)] = 0.0


class DoneLine(_Line, tag="done"):
    agent: str
    at: Annotated[float, Meta(ge=0)] = 0.0


Step = CallLine | ToolLine | DoneLine
_decoder = msgspec.json.Decoder(GraphLine | CallLine | ToolLine | DoneLine)


@dataclass(frozen=True, slots=True)
class TraceParams:
    path: str = ""

    @property
    def concurrent_agents(self) -> int:
        return sum(len(agents) for agents in load(Path(self.path))[1].values())


def load(path: Path) -> tuple[dict[str, GraphSpec], dict[str, dict[str, list[Step]]]]:
    """(graphs by run, steps by run and agent); raises ValueError naming the bad line."""
    graphs: dict[str, GraphSpec] = {}
    steps: dict[str, dict[str, list[Step]]] = defaultdict(lambda: defaultdict(list))
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = _decoder.decode(text)
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if isinstance(line, GraphLine):
            graphs[line.run] = line.graph
        else:
            steps[line.run][line.agent].append(line)
    if not steps:
        raise ValueError(f"{path}: no call, tool or done lines")
    return graphs, {run: dict(agents) for run, agents in steps.items()}


class TraceReplay:
    name = "trace"

    def __init__(self, params: TraceParams) -> None:
        self.params = params
        self.graphs, self.steps = load(Path(params.path))

    async def run(self, session: BenchSession) -> None:
        started = session.clock()
        await asyncio.gather(*(self._run(session, run, agents, started)
                               for run, agents in self.steps.items()))

    async def _run(self, session: BenchSession, run_name: str, agents: dict[str, list[Step]],
                   started: float) -> None:
        spec = self.graphs.get(run_name) or GraphSpec(
            name=run_name, agents=[AgentSpec(name=a) for a in agents])
        info = await session.client.create_graph(spec)
        async with session.job(run_name), await session.client.start_run(info) as run:
            await asyncio.gather(*(self._agent(session, run.agent(name), steps, started, run_name)
                                   for name, steps in agents.items()))
        await session.client.delete_graph(info)

    async def _agent(self, session: BenchSession, agent, steps: list[Step], started: float,
                     job: str) -> None:
        for step in steps:
            wait = started + step.at * session.time_scale - session.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if isinstance(step, CallLine):
                await session.chat(agent, step.messages, step.max_tokens, job)
            elif isinstance(step, ToolLine):
                await session.tool(agent, step.tool, step.duration_s)
            else:
                await agent.done()
