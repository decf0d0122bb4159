"""The engine's table of agents' current graph priorities, which the server keeps up to date.

A call is stamped with its agent's priority when it is made (`Attribution.priority`), but the
critical path moves as the run goes on: a tool call starts or ends, an agent is done, a call
ends. The server pushes each run's changed priorities (`EngineClient.set_priorities`); from then
on a call's priority is its agent's entry here, else its stamp:

    owner of the call           Sequence.priority
    --------------------------  --------------------------------------------
    None (unattributed)         the stamp
    (run, agent), an entry      the entry: the last priority pushed for the agent
    (run, agent), no entry      the stamp

Beside them, each run's remaining critical path in seconds, as the server last pushed it with
the run's outlook (`EngineClient.set_outlook`): a call reads it as `remaining_s` (None for an
unattributed call, or before the first push), and a policy may order runs by it.

Reading is two dict lookups: the scheduler sorts its waiting calls by priority every step. A
run's entries go with the run (`drop`, when the engine releases it), so nothing outlives it.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvrt.runtime.kv.owners import Owner


class Priorities:
    __slots__ = ("_runs", "_remaining")

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, float]] = {}  # run -> agent -> priority
        self._remaining: dict[str, float] = {}  # run -> seconds of its remaining critical path

    def of(self, owner: Owner | None, stamped: float) -> float:
        if owner is None:
            return stamped
        agents = self._runs.get(owner[0])
        return stamped if agents is None else agents.get(owner[1], stamped)

    def update(self, run: str, priorities: Mapping[str, float]) -> None:
        self._runs.setdefault(run, {}).update(priorities)

    def remaining(self, owner: Owner | None) -> float | None:
        return None if owner is None else self._remaining.get(owner[0])

    def set_remaining(self, run: str, seconds: float) -> None:
        self._remaining[run] = seconds

    def drop(self, run: str) -> None:
        self._runs.pop(run, None)
        self._remaining.pop(run, None)

    def of_run(self, run: str) -> dict[str, float]:
        """A copy of the run's entries (agent -> priority). Safe to call from another thread."""
        return dict(self._runs.get(run, {}))
