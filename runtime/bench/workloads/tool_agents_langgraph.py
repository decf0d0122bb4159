"""`tool-agents-langgraph`: `tool-agents`' plan played by a LangGraph application.

The same params, the same seeded plan (taken from a `ToolAgents` instance: system prompt, tasks,
worker counts, tool durations and outputs, output lengths in the same call order) and the same
declaration (agents, edges, expected output tokens, `run_tests` seconds), so comparing the two
under a policy measures how much of the graph-aware gain survives when the work comes through
kvrt's LangGraph adapter instead of the SDK. The graphs are in `tool_agents_graphs`: one per
worker count, planner -> worker0..worker{n-1} -> reviewer, each worker a standard ReAct loop
(`ToolNode`, `tools_condition`) invoked from its node's function. Needs the `langgraph` extra.
"""

from __future__ import annotations

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads.tool_agents import ToolAgents, ToolAgentsParams


class ToolAgentsLangGraph:
    name = "tool-agents-langgraph"

    def __init__(self, params: ToolAgentsParams) -> None:
        self.params = params
        self.plan = ToolAgents(params)  # the plan; its own run() is not used

    async def run(self, session: BenchSession) -> None:
        from kvrt.runtime.bench.workloads.tool_agents_graphs import Team  # the `langgraph` extra

        team = await Team.start(self.plan, session)
        try:
            await team.play_all()
        finally:
            await team.stop()
