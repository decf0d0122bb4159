"""Per-(agent, tool) call durations learned online from observed start/finish pairs.

Shared by every run of a graph: the same agent calling the same tool behaves alike across runs.
The estimate is the plain mean of the first few observations, then an exponentially weighted
mean, so it settles fast and still follows a tool that slows down or speeds up.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_WEIGHT = 0.25  # weight of the newest observation once there are more than 4


@dataclass(slots=True)
class ToolEstimate:
    declared: float | None  # seconds, from the graph declaration
    observations: int = 0
    learned: float | None = None

    @property
    def seconds(self) -> float | None:
        return self.learned if self.learned is not None else self.declared

    def observe(self, seconds: float) -> None:
        self.observations += 1
        weight = max(1.0 / self.observations, _MIN_WEIGHT)
        self.learned = seconds if self.learned is None else (
            self.learned + weight * (seconds - self.learned))


class ToolEstimates:
    def __init__(self, declared: dict[tuple[str, str], float]) -> None:
        self._by_call = {key: ToolEstimate(seconds) for key, seconds in declared.items()}

    def seconds(self, agent: str, tool: str) -> float:
        """The expected duration of one call; 0 for a tool never declared nor observed."""
        estimate = self._by_call.get((agent, tool))
        seconds = estimate.seconds if estimate is not None else None
        return 0.0 if seconds is None else seconds

    def observe(self, agent: str, tool: str, seconds: float) -> None:
        self._by_call.setdefault((agent, tool), ToolEstimate(None)).observe(seconds)

    def restore(self, agent: str, tool: str, observations: int, learned: float) -> None:
        """Takes back a saved estimate (runtime/graph/store.py), declared seconds kept."""
        estimate = self._by_call.setdefault((agent, tool), ToolEstimate(None))
        estimate.observations, estimate.learned = observations, learned

    def items(self) -> list[tuple[tuple[str, str], ToolEstimate]]:
        return sorted(self._by_call.items())
