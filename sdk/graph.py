"""`Graph`: a thin builder for the GraphSpec that POST /v1/graphs takes.

The daemon is the authority on what makes a valid graph (unknown agents in an edge, duplicate
names, limits); the builder only collects declarations, so its graphs fail where every client's
do, with the daemon's message and code.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvrt.sdk.protocol.control import AgentSpec, EdgeSpec, GraphSpec, Reuse


class Graph:
    """An agent graph under construction. `agent` and `edge` return the graph, so calls chain:

        g = Graph("research").agent("planner", "You plan.").agent("writer")
        g.edge("planner", "writer")
    """

    def __init__(self, name: str, *, reuse: Reuse = "exact") -> None:
        self.name = name
        self.reuse: Reuse = reuse
        self.agents: list[AgentSpec] = []
        self.edges: list[tuple[str, str] | EdgeSpec] = []

    def agent(
        self,
        name: str,
        system: str | None = None,
        *,
        tools: Mapping[str, float] | None = None,
        expected_output_tokens: int | None = None,
        importance: float = 1.0,
    ) -> Graph:
        """Declares an agent. `tools` maps each tool it may call to the seconds a call is expected
        to take. `system`, when given, is the agent's system prompt: the SDK's `AgentClient.chat`
        and `.stream` put it first in every call whose messages carry no system message."""
        self.agents.append(AgentSpec(
            name=name,
            system=system,
            tools=dict(tools or {}),
            expected_output_tokens=expected_output_tokens,
            importance=importance,
        ))
        return self

    def edge(self, src: str, dst: str, *, expected_iterations: int | None = None) -> Graph:
        """Declares that `src`'s output feeds `dst`. `expected_iterations` is for an edge that
        closes a loop: how often the loop is expected to run."""
        if expected_iterations is None:
            self.edges.append((src, dst))
        else:
            self.edges.append(
                EdgeSpec(source=src, target=dst, expected_iterations=expected_iterations)
            )
        return self

    def spec(self) -> GraphSpec:
        return GraphSpec(
            name=self.name, agents=list(self.agents), edges=list(self.edges), reuse=self.reuse
        )

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, agents={len(self.agents)}, edges={len(self.edges)})"
