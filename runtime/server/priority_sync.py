"""Keeps the engine's priorities and outlook of each live run current as its critical path
moves.

A call is stamped with its agent's priority when it is made, but the critical path moves with
every event and call. The server computes a run's priorities (`run.criticality()`, then
`run.priority(i, ...)` per agent: O(V+E), on the loop) at these moments and pushes to the
engine (`EngineClient.set_priorities`) only the agents whose priority changed since the
run's last push, every agent the first time:

    moment                          who                            criticality
    ------------------------------  -----------------------------  ----------------------------
    POST /v1/runs started a run     control_routes: track(run)     none; nothing pushed yet
    an event was applied            control_routes: soon(run)      computed once per loop turn
    a call ended                    SyncedCall.ended: soon(run)    (at most once per 10 ms),
                                                                   however many events and
                                                                   calls of the run came
    calls were submitted            model_calls.submit_calls:      their contexts' (one for
                                    push(run, criticality)         the stamps and the push)
    DELETE /v1/runs/{id}            control_routes: forget(run)    (later pushes are ignored)

Each push also sends the run's outlook (`EngineClient.set_outlook`): its remaining critical path
in seconds (`criticality.length`: what the engine orders runs by) and, per agent, the predicted
seconds to its next model call (`run.next_use`: what eviction and prefetch go by). These move
with time, so the whole outlook goes every push.

Only tracked runs are pushed: a run's entries leave the engine's table when the engine
releases the run, and a call of an ended run that ends afterwards must not put them back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from kvrt.runtime.graph.critical_path import Criticality
from kvrt.runtime.graph.runs import AgentCall, Run

# Seconds between two pushes of one run after events and call ends: a priority at most this
# stale, against a critical path of calls and tools that take seconds.
MIN_PUSH_INTERVAL_S = 0.01


class PrioritySink(Protocol):
    """Where the pushes go: the engine (EngineClient.set_priorities)."""

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None: ...

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None: ...


class PrioritySync:
    def __init__(self, engine: PrioritySink) -> None:
        self._engine = engine
        # live run id -> the priorities last pushed, by agent index (None: none yet)
        self._pushed: dict[str, list[float] | None] = {}
        self._soon: set[str] = set()  # runs whose push is scheduled
        self._pushed_at: dict[str, float] = {}  # run id -> loop time of its last scheduled push

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._pushed

    def track(self, run: Run) -> None:
        self._pushed.setdefault(run.id, None)

    def forget(self, run: Run) -> None:
        self._pushed.pop(run.id, None)
        self._pushed_at.pop(run.id, None)

    def push(self, run: Run, criticality: Criticality | None = None) -> None:
        """Sends the engine the run's priorities that changed, and its outlook, as of
        `criticality` (None: the run as it is now)."""
        if run.id not in self._pushed:
            return
        if criticality is None:
            criticality = run.criticality()
        now = [run.priority(i, criticality) for i in range(len(run.graph.agents))]
        last = self._pushed[run.id]
        agents = run.graph.agents
        changed = {agents[i].name: priority for i, priority in enumerate(now)
                   if last is None or last[i] != priority}
        self._pushed[run.id] = now
        if changed:
            self._engine.set_priorities(run.id, changed)
        self._engine.set_outlook(run.id, criticality.length, {
            agent.name: run.next_use(i, criticality) for i, agent in enumerate(agents)})

    def soon(self, run: Run) -> None:
        """Pushes the run's priorities at the loop's next turn, and no sooner than
        MIN_PUSH_INTERVAL_S after its last push: the events handled meanwhile, and the calls
        that end together (a round's, delivered by one engine step), cost one critical path,
        computed after their replies are on their way. A run flooded with events costs the
        loop one critical path per interval, not one per event."""
        if run.id in self._soon or run.id not in self._pushed:
            return
        self._soon.add(run.id)
        loop = asyncio.get_running_loop()
        since = loop.time() - self._pushed_at.get(run.id, -MIN_PUSH_INTERVAL_S)
        loop.call_later(max(MIN_PUSH_INTERVAL_S - since, 0.0), self._push_soon, run)

    def _push_soon(self, run: Run) -> None:
        self._soon.discard(run.id)
        self._pushed_at[run.id] = asyncio.get_running_loop().time()
        self.push(run)


@dataclass(slots=True)
class SyncedCall:
    """An agent's model call (a CallObserver) whose end moves its run's priorities."""

    call: AgentCall
    run: Run
    sync: PrioritySync

    def produced(self, tokens: int) -> None:
        self.call.produced(tokens)

    def ended(self) -> None:
        self.call.ended()
        self.sync.soon(self.run)


PRIORITY_SYNC = web.AppKey("priority_sync", PrioritySync)
