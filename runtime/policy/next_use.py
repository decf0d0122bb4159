"""Eviction and prefetch by when an agent's KV is next needed (KVFlow's steps-to-execution, in
predicted seconds), read off the run's outlook (`on_outlook`: the server's prediction of each
agent's next model call, runtime/graph/runs.py `next_use`).

Retention: each owner's cached blocks get a retention level (runtime/kv/block_pool.py: the
lowest level is evicted first, least recently used first within a level; a block several
owners hold keeps the highest of their levels). It is soft: nothing is pinned, a block of the
highest level still goes when nothing else is left to evict, so retention can never stall the
engine (SGLang and vLLM moved from hard pins to such priority hints).

    seconds to the owner's next call   level
    ---------------------------------  ---------------------------------------------
    none: the agent is done            0          the first to go
    > 300 (inf: no work predicted)     1
    no outlook yet (never pushed)      2          DEFAULT_RETENTION: as nobody said
    (60, 300]                          3
    (20, 60]                           4
    (5, 20]                            5
    (1, 5]                             6
    <= 1                               7          the last to go

Levels move with time (a tool call predicted at 100 s starts at 3 and ends at 7), so they are
recomputed at each outlook and every RELEVEL_EVERY_S of the engine's clock.

Prefetch: an owner whose next call is due within `prefetch_horizon_s` and whose KV sits on the
host tier and not on the device gets it back (Prefetch: only into free blocks or blocks of a
lower level, so it never preempts running work nor evicts anything more urgent), while
`pressure_free_fraction` of the pool stays free or cached afterwards for running calls to grow
into (blocks on their way up cannot be handed to them).
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from kvrt.runtime.kv.block_pool import DEFAULT_RETENTION
from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.policy.decisions import Decision, Prefetch, Retain
from kvrt.runtime.policy.view import KVState

RELEVEL_EVERY_S = 0.25
_LEVELS = ((1.0, 7), (5.0, 6), (20.0, 5), (60.0, 4), (300.0, 3))


def retention_level(until_use_s: float | None) -> int:
    """The level of KV whose owner's next call is `until_use_s` seconds away (None: never)."""
    if until_use_s is None:
        return 0
    for bound, level in _LEVELS:
        if until_use_s <= bound:
            return level
    return 1


class NextUse:
    """The owners' predicted next calls, and the levels and prefetches that follow from them."""

    def __init__(self, retain: bool, prefetch: bool, horizon_s: float,
                 headroom: float) -> None:
        """`retain`: set retention levels; `prefetch`: make prefetches (either may be off),
        leaving at least `headroom` of the pool free or cached for running calls to grow into
        (blocks on their way up cannot be handed to them)."""
        self.retain, self.prefetch, self.horizon_s = retain, prefetch, horizon_s
        self.headroom = headroom
        self.due: dict[Owner, float | None] = {}  # owner -> clock time of its next call
        self.levels: dict[Owner, int] = {}  # the level last set, per owner
        self.prefetches = 0  # Prefetch decisions made
        self._prefetched: dict[Owner, float] = {}  # owner -> the next call it was made for
        self._leveled_at = float("-inf")

    def update(self, run: str, due: Mapping[str, float | None], kv: KVState,
               now: float) -> list[Decision]:
        for agent, at in due.items():
            self.due[(run, agent)] = at
        return [d for agent in due for d in self._relevel((run, agent), now)]

    def expect(self, owner: Owner, at: float | None, now: float) -> list[Decision]:
        """The owner's next call is due at `at` (an event said so: a tool started or ended;
        None: agent.done, no call until the client says otherwise)."""
        self.due[owner] = at
        return list(self._relevel(owner, now))

    def on_step(self, kv: KVState, now: float,
                planned: Container[Owner] = ()) -> list[Decision]:
        """`planned`: owners whose KV comes back by a planned upload (not prefetched)."""
        decisions: list[Decision] = []
        if self.retain and now - self._leveled_at >= RELEVEL_EVERY_S:
            self._leveled_at = now
            for owner in self.due:
                decisions.extend(self._relevel(owner, now))
        if not (self.prefetch and kv.has_host_tier):
            return decisions
        usage = kv.usage()
        # Blocks a prefetch may take (decisions are carried out after this hook returns). Checked
        # before asking what each owner would prefetch, which costs a walk of its host blocks.
        room = usage.free + usage.cached - self.headroom * usage.total
        if room < 1:
            return decisions
        for owner, at in self.due.items():
            if (at is None or at - now > self.horizon_s or owner in planned
                    or self._prefetched.get(owner) == at):
                continue
            wanted = kv.prefetchable_blocks(owner)
            if wanted and wanted <= room:
                # Once per expected call: what running calls evict again afterwards stays on the
                # host (else the two would trade the same blocks at every step).
                self._prefetched[owner] = at
                self.prefetches += 1
                decisions.append(Prefetch(owner))
        return decisions

    def forget(self, run: str) -> None:
        for state in (self.due, self.levels, self._prefetched):
            for owner in [o for o in state if o[0] == run]:
                del state[owner]

    def _relevel(self, owner: Owner, now: float):
        if not self.retain:
            return
        at = self.due.get(owner, None)
        level = retention_level(None if at is None else max(at - now, 0.0))
        if self.levels.get(owner, DEFAULT_RETENTION) != level:
            self.levels[owner] = level
            yield Retain(owner, level)
