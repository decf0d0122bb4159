"""A run's passes through its graph (episodes), and the transitions observed in them.

An episode is one pass: a LangGraph thread invoked again is the same run, and each invocation
is a new episode. It begins with the first model call after the run started or the last
episode ended, and ends when every agent active in it (one that made a call, or started a
tool or a wait) is done (agent.done), or when the run ends (DELETE), whichever comes first.
At its end, (the agent whose activity ended last, END) is counted, its per-agent counters are
folded into the graph's means (LearnedGraph.fold), and they start again from zero; the agents
the episode left done are revived by the next episode's first call (a new pass may reach them
all). An episode without a model call folds nothing.

An application may report each agent done as soon as it has finished (a pipeline: planner
done, then the searcher starts), not all of them at the end of the pass as the LangGraph
adapter does. Its episode seems over after the first agent; the next call shows it was not:
if the next model call after an episode ended is of an agent B that the episode did not reach
(no call, tool or wait of B in it) and one of B's declared predecessors was active in it, the
episode is reopened: its fold and its (last, END) are taken back, what happened since (a tool
call of B, say) joins it, the done agents stay done, and the call is counted as in the
episode (the transition from that predecessor). Otherwise the call begins a new episode.

Transitions. An agent's activity ends at the end of one of its model calls or at the finish
of one of its tool calls or waits; `last_end` is the latest, in this episode. When agent B's
model call is submitted, its predecessor is, among B's declared predecessors (B itself when
the self-edge B -> B is declared), the one whose activity ended last in this episode (the
first declared on a tie):

    predecessor          counted            when
    -------------------  -----------------  -------------------------------------------------
    A != B               (A, B)             A's end is later than B's last call start in this
                                            episode (or B made none): B was not already
                                            running since (its later calls of one visit are
                                            not new transitions)
    B (declared B -> B)  (B, B)             always: B's own end is the latest
    none                 (START, B)         B's first call of the episode

Only declared edges are candidates: the declaration is the superset of what can happen.
Counts go to the run (its own transitions, over all its episodes) and, live, to the graph's
totals. In a fan-out (planner -> 3 workers -> reviewer) each worker's first call counts
(planner, worker), and the reviewer's first call (last worker to finish, reviewer) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvrt.runtime.graph.learning import END, START, LearnedGraph


@dataclass(slots=True)
class AgentEpisode:
    """One agent's counters in the current episode of a run."""

    active: bool = False
    calls: int = 0  # model calls started
    ended_calls: int = 0
    ended_tokens: int = 0  # output tokens of the ended calls
    tools: dict[str, int] = field(default_factory=dict)  # tool calls started, by tool
    last_call_start: float | None = None
    last_end: float | None = None  # its latest activity end

    def absorb(self, later: AgentEpisode) -> None:
        """Adds what `later` (counted after this part's episode seemed over) saw."""
        self.active = self.active or later.active
        self.calls += later.calls
        self.ended_calls += later.ended_calls
        self.ended_tokens += later.ended_tokens
        for tool, calls in later.tools.items():
            self.tools[tool] = self.tools.get(tool, 0) + calls
        if later.last_call_start is not None:
            self.last_call_start = later.last_call_start
        if later.last_end is not None:
            self.last_end = later.last_end


class _Agent(Protocol):
    done: bool
    episode: AgentEpisode


class RunEpisodes:
    """The episodes of one run, over its agents' activity (AgentActivity)."""

    def __init__(self, learned: LearnedGraph, agents: Sequence[_Agent]) -> None:
        self.learned, self.agents = learned, agents
        self.transitions: dict[tuple[int, int], int] = {}
        self.count = 0  # episodes folded
        self._calls = 0  # model calls in the current episode
        # The episode that ended last, until the next call: (its parts, its last agent).
        self._ended: tuple[list[AgentEpisode], int] | None = None

    def call_submitted(self, target: int, now: float) -> None:
        if self._calls == 0 and self._ended is not None:
            parts, last = self._ended
            self._ended = None
            if not parts[target].active and any(
                    parts[p].last_end is not None for p in self.learned.predecessors[target]):
                self._reopen(parts, last)
            else:
                for agent in self.agents:  # a new pass: the last one's done agents may run again
                    agent.done = False
        part = self.agents[target].episode
        source, source_end = None, 0.0
        for candidate in self.learned.predecessors[target]:
            end = self.agents[candidate].episode.last_end
            if end is not None and (source is None or end > source_end):
                source, source_end = candidate, end
        if source is None:
            if part.calls == 0:
                self._count(START, target)
        elif (source == target or part.last_call_start is None
              or source_end > part.last_call_start):
            self._count(source, target)
        part.active = True
        part.calls += 1
        part.last_call_start = now
        self._calls += 1

    def tool_started(self, agent: int, tool: str) -> None:
        part = self.agents[agent].episode
        part.active = True
        part.tools[tool] = part.tools.get(tool, 0) + 1

    def agent_done(self) -> None:
        """Ends the episode if every agent active in it is done."""
        if self._calls and all(a.done for a in self.agents if a.episode.active):
            self.end()

    def end(self) -> None:
        """Ends the episode (a run's end): counts its last agent, folds it, starts afresh."""
        if not self._calls:
            return
        active = [i for i, a in enumerate(self.agents) if a.episode.active]
        last = max(active, key=lambda i: (self.agents[i].episode.last_end is not None,
                                           self.agents[i].episode.last_end or 0.0,
                                           self.agents[i].episode.last_call_start or 0.0))
        self._count(last, END)
        parts = [a.episode for a in self.agents]
        self.learned.fold(parts)
        for agent in self.agents:
            agent.episode = AgentEpisode()
        self.count += 1
        self._calls = 0
        self._ended = (parts, last)

    def _reopen(self, parts: list[AgentEpisode], last: int) -> None:
        """Takes back the fold of an episode that was not over (see the module docstring)."""
        self._count(last, END, -1)
        self.learned.fold(parts, sign=-1)
        self.count -= 1
        for agent, part in zip(self.agents, parts):
            part.absorb(agent.episode)
            agent.episode = part
        self._calls = sum(part.calls for part in parts)

    def _count(self, source: int, target: int, times: int = 1) -> None:
        self.transitions[source, target] = self.transitions.get((source, target), 0) + times
        if not self.transitions[source, target]:
            del self.transitions[source, target]
        self.learned.count(source, target, times)
