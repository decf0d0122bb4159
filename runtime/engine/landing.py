"""When the policy's predictive uploads land, against when the tool actually returned.

A policy that moves an agent's KV to the host while its tool runs plans the upload back so that
it lands before the tool returns (`Upload.due`: the predicted return). Whether it does is seen
only here, on the engine's clock, from three reports per owner:

    report                    by                                     when
    ------------------------  -------------------------------------  ---------------------------
    planned(owner, due)       carrying out an Upload with a `due`    the move started
    landed(owner, now)        the engine's tick                      the KV manager completed it
    returned(owner, now)      the engine's notify                    tool_call.finished arrived

Once an owner's upload has both landed and returned, one sample is kept: landing minus return
(negative: in time), whether the tool returned before its predicted time (an early return:
no upload planned for the prediction can beat it), and the landing minus the predicted return.
Uploads the tool's finish or an admission asked for carry no `due` and are not watched. A watch
whose landing or return never comes (a failed copy, an agent done without a finish) is dropped
when its run ends.

Bounded: the last `keep` samples, and counters and a histogram since start. Written
on the engine thread, read from the event loop (`stats`): a lock orders the two.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field

from kvrt.runtime.kv.owners import Owner

# Landing minus return, seconds (negative: in time); for the histogram of /metrics.
LANDING_BUCKETS = (-5.0, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True, slots=True)
class LandingSample:
    landed_after_s: float  # the landing minus the tool's actual return (negative: in time)
    early_return: bool  # the tool returned before its predicted time
    # The landing minus the predicted return: what the upload's lead controls (the rest of
    # landed_after_s is the prediction's error).
    after_due_s: float


@dataclass(frozen=True, slots=True)
class LandingStats:
    """Predictive uploads whose landing and return were both seen, since start."""

    recent: tuple[LandingSample, ...] = ()  # the last ones, oldest first
    early_returns: int = 0
    # Of the others (the tool did not return early): landed_after_s counted per bucket (each
    # count alone, not cumulative; the last: above the last bound), with their sum and count.
    buckets: tuple[float, ...] = LANDING_BUCKETS
    bucket_counts: tuple[int, ...] = (0,) * (len(LANDING_BUCKETS) + 1)
    sum_s: float = 0.0
    count: int = 0


@dataclass(slots=True)
class _Watch:
    due: float
    landed: float | None = None
    returned: float | None = None


@dataclass(slots=True)
class UploadLandings:
    keep: int = 4096
    _watches: dict[Owner, _Watch] = field(default_factory=dict)
    _recent: deque[LandingSample] = field(init=False)
    _early: int = 0
    _counts: list[int] = field(default_factory=lambda: [0] * (len(LANDING_BUCKETS) + 1))
    _sum: float = 0.0
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.keep)

    def planned(self, owner: Owner, due: float) -> None:
        self._watches[owner] = _Watch(due)  # a new upload of the owner replaces the last

    def landed(self, owner: Owner, now: float) -> None:
        watch = self._watches.get(owner)
        if watch is not None and watch.landed is None:
            watch.landed = now
            self._settle(owner, watch)

    def returned(self, owner: Owner, now: float) -> None:
        watch = self._watches.get(owner)
        if watch is not None and watch.returned is None:
            watch.returned = now
            self._settle(owner, watch)

    def forget_run(self, run: str) -> None:
        for owner in [o for o in self._watches if o[0] == run]:
            del self._watches[owner]

    def _settle(self, owner: Owner, watch: _Watch) -> None:
        if watch.landed is None or watch.returned is None:
            return
        del self._watches[owner]
        sample = LandingSample(watch.landed - watch.returned, watch.returned < watch.due,
                               watch.landed - watch.due)
        with self._lock:
            self._recent.append(sample)
            if sample.early_return:
                self._early += 1
                return
            self._counts[bisect.bisect_left(LANDING_BUCKETS, sample.landed_after_s)] += 1
            self._sum += sample.landed_after_s
            self._count += 1

    def stats(self) -> LandingStats:
        with self._lock:
            return LandingStats(tuple(self._recent), self._early, LANDING_BUCKETS,
                                tuple(self._counts), self._sum, self._count)
