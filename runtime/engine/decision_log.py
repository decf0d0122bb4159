"""The policy's recent decisions, as the engine carried them out: a bounded ring for the live
view (GET /ui/state). Nothing reads it to decide; it only shows.

    written   on the engine thread, as each decision goes to `carry_out` (`recording`)
    read      from any thread (`recent`): a lock, since copying a deque while another thread
              appends to it raises
    bounded   the last `capacity` decisions; older ones fall off
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kvrt.runtime.policy.decisions import (
    Backup,
    Decision,
    Offload,
    Pin,
    Prefetch,
    Retain,
    Unpin,
    Upload,
)

CAPACITY = 256


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    at: float  # the engine's clock when it was carried out
    kind: str  # pin, unpin, offload, upload, backup, retain, prefetch
    cause: str  # what the policy was answering: an event's type, "step", "priorities", ...
    run: str | None  # the owner's, when the decision has one (a backup names blocks)
    agent: str | None
    detail: str  # "level 5", "due in 1.20 s", "3 blocks"; "" when there is nothing more


@dataclass(frozen=True, slots=True)
class RecentDecisions:
    now: float  # the engine's clock when read: a record's age is now - at
    records: tuple[DecisionRecord, ...]  # oldest first


class DecisionLog:
    def __init__(self, clock: Callable[[], float], capacity: int = CAPACITY) -> None:
        self._clock = clock
        self._ring: deque[DecisionRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def recording(self, decisions: Iterable[Decision], cause: str) -> Iterator[Decision]:
        """Passes `decisions` on one at a time (a policy's hook may read the effect of one
        before it yields the next), recording each as it goes."""
        for decision in decisions:
            record = _record(decision, self._clock(), cause)
            with self._lock:
                self._ring.append(record)
            yield decision

    def recent(self) -> RecentDecisions:
        with self._lock:
            records = tuple(self._ring)
        return RecentDecisions(self._clock(), records)


def _record(decision: Decision, now: float, cause: str) -> DecisionRecord:
    owner: tuple[str, str] | None = None
    detail = ""
    match decision:
        case Pin(owner) | Unpin(owner) | Offload(owner) | Prefetch(owner):
            pass
        case Upload(owner, due):
            detail = "" if due is None else f"due in {due - now:.2f} s"
        case Retain(owner, level):
            detail = f"level {level}"
        case Backup(block_ids):
            detail = f"{len(block_ids)} blocks"
    run, agent = owner if owner is not None else (None, None)
    return DecisionRecord(now, type(decision).__name__.lower(), cause, run, agent, detail)
