"""`tokencake`: the graph-aware policy. Temporal: an agent's KV leaves the device while it waits
on a long tool and comes back just before the tool returns. Spatial: admission and victims
follow the runs' remaining work and the agents' graph priority, not arrival alone, and the KV
kept is the KV needed soonest.

Temporal, on `tool_call.started` (the decision and its reason are counted in `decisions`):

    condition                                              decision
    -----------------------------------------------------  ----------------------------------
    no host tier                                           keep: no_host_tier
    the agent holds no cached KV (nothing idle to move)    keep: nothing_cached
    free device blocks >= pressure_free_fraction of pool    keep: no_pressure
    predicted tool time < offload_margin x round trip       keep: short_tool
    otherwise                                              offload: its cached blocks to host

round trip = 2 x (copy_latency_s + bytes / bandwidth), the bandwidth learned from the copies
observed so far (their average), `prior_bandwidth` before the first. An offloaded agent's KV is
uploaded at `started + predicted - upload time - upload_lead_s - 2 x tick` (tick: the longest
of the engine's recent intervals between on_step calls; with `timed_upload_lead` off, 0), or at
`tool_call.finished` if the tool returns first; if its next call comes before either, admission
uploads it on demand. The engine times the planned uploads' landings against the actual returns.
(The decision is "keep: host_full" when the host tier can take none of it.) A tool usually
starts right after the call that asked for it, while write-through (below) is still copying
that call's last blocks to the host: those blocks look busy, not cached, until the copies land.
So when the agent holds no cached KV but such blocks, or a prefetch is bringing its KV up, the
decision waits for them (a step or two) and is then made on what is left of the predicted
time.

Spatial, across runs (`cross_run`, the default): waiting calls are admitted in order of
`due_in - aging x seconds waited`, where due_in is the run's remaining critical path (the
outlook the server pushes, `remaining_s`) plus the agent's slack off it (remaining x
(1 - priority)): the runs closest to done first (shortest remaining work, for the mean
completion time), each call's turn fixed by its arrival (with aging 1, earliest deadline
first), so none starves; the victim under pressure is the call due last. Within runs only
(`cross_run` off, the earlier order): by descending graph priority plus `aging_per_s` for each
second waited; the victim is the lowest priority, latest arrival.

Retention (`retention`): with "next-use" (the default) every agent's KV gets a retention level
from the predicted time to its next call, and agents about to run get their KV back from the
host ahead of the call (prefetch): runtime/policy/next_use.py. With "pins", agents of priority
at least `reserve_priority` (on the critical path) keep their KV reserved between calls: pinned
when a call finishes, while all pins fit the budget (`reserve_fraction` of what running calls
leave of the pool), so a burst of less important calls cannot evict it. As running calls grow,
the budget shrinks and the least important reservations are lent to them; as they end, those
are reclaimed (pinned again, whatever is left of them). A reservation ends when the agent's
next call is admitted (its references protect what it reuses), when it goes to the host, at
agent.done, under a stall (the lowest priority's first), when the agent's priority falls below
`reserve_priority` (off the critical path: decision "release:priority"; one that rises above it
is reserved when its next call finishes), and at its deadline, so that an agent whose tool
never reports back does not hold the pool (decision "release:deadline"):

    reservation made or renewed            ends, lent or not, at the latest
    -------------------------------------  ---------------------------------------------------
    its call finished                      now + tool_deadline_min_s
    tool_call.started, predicted p         now + max(tool_deadline_factor x p, tool_deadline_min_s)
    tool_call.finished                     now + tool_deadline_min_s (the next call is near)

Parameters: runtime/policy/config.py.

Write-through: every block a step computes is copied to the host in the background (the
device keeps it), so an eviction or a preemption on the device loses nothing that the next
call cannot upload instead of computing again.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping

from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.policy.base import CallT, Decisions, Policy, register_policy
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.decisions import Backup, Offload, Pin, Unpin, Upload
from kvrt.runtime.policy.next_use import NextUse
from kvrt.runtime.policy.view import Call, Event, KVState

TICK_WINDOW = 32  # on_step intervals the upload lead looks back over


@register_policy("tokencake")
class TokencakePolicy(Policy):
    options = (TokencakeConfig,)

    def __init__(self, config: TokencakeConfig | None = None) -> None:
        self.config = config or TokencakeConfig()
        self.away: dict[Owner, float] = {}  # offloaded owner -> clock time to bring it back
        # Tool started while its KV was still being written through: (started, predicted s,
        # reserved priority) until those copies land and the decision is made.
        self.deciding: dict[Owner, tuple[float, float | None, float | None]] = {}
        self.reserved: dict[Owner, float] = {}  # owner -> priority, its KV pinned between calls
        self.lent: dict[Owner, float] = {}  # reservations lent to running calls, to reclaim
        self.deadlines: dict[Owner, float] = {}  # reserved or lent owner -> when it ends
        self.decisions: Counter[str] = Counter()
        self.last_decision: dict[Owner, str] = {}  # per agent, for the run state
        self.next_use = NextUse(self.config.retention == "next-use", self.config.prefetch,
                                self.config.prefetch_horizon_s,
                                self.config.pressure_free_fraction)
        self._now = 0.0  # the engine's clock at the last step
        self.returns: dict[Owner, float] = {}  # offloaded owner -> its tool's predicted return
        self._last_tick: float | None = None  # on_step's last `now`, and the intervals since
        self._ticks: deque[float] = deque(maxlen=TICK_WINDOW)

    # -- spatial ------------------------------------------------------------------------------

    def admission_key(self, call: Call) -> tuple:
        waited = max(0.0, self._now - call.arrival)
        if self.config.cross_run:
            return (due_in(call) - self.config.aging * waited, call.arrival, call.order)
        priority = call.priority + self.config.aging_per_s * waited
        return (-priority, call.arrival, call.order)

    def victim(self, running: list[CallT]) -> CallT:
        if self.config.cross_run:
            return max(running, key=lambda c: (due_in(c), c.arrival, c.order))
        return min(running, key=lambda c: (c.priority, -c.arrival, -c.order))

    def on_outlook(self, run: str, remaining_s: float, due: Mapping[str, float | None],
                   kv: KVState, now: float) -> Decisions:
        yield from self.next_use.update(run, due, kv, now)

    def on_finish(self, call: Call, kv: KVState) -> Decisions:
        owner, priority = call.owner, call.priority
        if (owner is None or self.config.retention != "pins"
                or priority < self.config.reserve_priority):
            return
        if (yield from self._reserve(owner, priority, kv)):
            self.deadlines[owner] = self._now + self.config.tool_deadline_min_s

    def on_priorities(self, run: str, priorities: Mapping[str, float],
                      kv: KVState) -> Decisions:
        """Reservations, held or lent, follow their agents' new priorities; those that fell
        below `reserve_priority` end."""
        for state in (self.reserved, self.lent):
            for owner in [o for o in state if o[0] == run and o[1] in priorities]:
                state[owner] = priority = priorities[owner[1]]
                if priority < self.config.reserve_priority:
                    self.decisions["release:priority"] += 1
                    self.last_decision[owner] = "release:priority"
                    yield from self._end_reservation(owner)

    def on_admit(self, call: Call, kv: KVState) -> Decisions:
        owner = call.owner
        if owner is None:
            return
        self.away.pop(owner, None)  # its KV is back (or on its way, for this very call)
        self.deciding.pop(owner, None)
        yield from self._end_reservation(owner)

    def reserve_budget(self, kv: KVState) -> float:
        """Blocks the reservations may pin: `reserve_fraction` of the pool that running calls
        leave. It shrinks as their demand grows (the lowest priorities are lent to them) and
        grows back as it falls (the lent ones are reclaimed, highest priority first)."""
        usage, pinned = kv.usage(), kv.num_pinned()
        running = max(0, usage.in_use - pinned)
        return self.config.reserve_fraction * (usage.total - running)

    def _reserve(self, owner: Owner, priority: float, kv: KVState) -> Decisions:
        """Pins the owner's KV if it fits the budget; returns whether it did (None if it holds
        nothing to pin)."""
        keyed = kv.pinnable_blocks(owner)
        if not keyed:
            return None
        if kv.num_pinned() + keyed > self.reserve_budget(kv):
            return False
        yield Pin(owner)
        self.reserved[owner] = priority
        return True

    def _fit_reservations(self, kv: KVState) -> Decisions:
        budget = self.reserve_budget(kv)
        while self.reserved and kv.num_pinned() > budget:
            owner = min(self.reserved, key=self.reserved.__getitem__)
            self.lent[owner] = self.reserved[owner]
            yield from self._unreserve(owner)
        for owner in sorted(self.lent, key=self.lent.__getitem__, reverse=True):
            if (yield from self._reserve(owner, self.lent[owner], kv)) is False:
                break  # it does not fit yet: the less important wait behind it
            self.lent.pop(owner)  # reclaimed, or nothing of it is left to reserve

    def _expire(self, now: float, kv: KVState) -> Decisions:
        """Ends the reservations (held or lent) past their deadline."""
        for owner, until in list(self.deadlines.items()):
            if until > now:
                continue
            del self.deadlines[owner]
            held = owner in self.reserved and kv.is_pinned(owner)
            if held or self.lent.pop(owner, None) is not None:
                self.decisions["release:deadline"] += 1
                self.last_decision[owner] = "release:deadline"
            if owner in self.reserved:
                yield from self._unreserve(owner)

    def on_stall(self, kv: KVState, now: float) -> Decisions:
        live = [o for o in self.reserved if kv.is_pinned(o)]  # a run's end drops its pins
        if live:
            yield from self._unreserve(min(live, key=self.reserved.__getitem__))
        self.reserved = {o: p for o, p in self.reserved.items() if kv.is_pinned(o)}

    def _end_reservation(self, owner: Owner) -> Decisions:
        """The owner's reservation, held or lent, and its deadline, are over."""
        self.lent.pop(owner, None)
        self.deadlines.pop(owner, None)
        if owner in self.reserved:
            yield from self._unreserve(owner)

    def _unreserve(self, owner: Owner) -> Decisions:
        self.reserved.pop(owner, None)
        yield Unpin(owner)

    # -- temporal -----------------------------------------------------------------------------

    def kv_decisions(self) -> dict[str, int]:
        return dict(self.decisions)  # one C-level copy: safe against the engine thread

    def kv_decisions_of(self, run: str) -> dict[str, str]:
        return {agent: d for (r, agent), d in self.last_decision.copy().items() if r == run}

    def on_run_end(self, run: str) -> None:
        for state in (self.away, self.deciding, self.reserved, self.lent, self.deadlines,
                      self.last_decision):
            for owner in [o for o in state if o[0] == run]:
                del state[owner]  # its pins went with the run (KVManager.release_run)
        self.next_use.forget(run)

    def on_event(self, event: Event, kv: KVState, now: float) -> Decisions:
        owner = (event.run, event.agent)
        if event.kind == "tool_call.started":
            # Its next call comes after the tool: known here before the run's next outlook.
            yield from self.next_use.expect(owner, now + (event.predicted_s or 0.0), now)
            priority = self.reserved.get(owner)
            yield from self._end_reservation(owner)  # its cached blocks may go to the host
            if _unsettled(owner, kv):
                # The call that just ended is still being written through to the host, or a
                # prefetch is bringing its KV up: decide once those copies land (a step or
                # two), not on KV that looks busy.
                self.deciding[owner] = (now, event.predicted_s, priority)
                return
            yield from self._tool_started(owner, now, event.predicted_s, priority, kv, now)
        elif event.kind == "tool_call.finished":
            yield from self.next_use.expect(owner, now, now)
            self.deciding.pop(owner, None)
            if owner in self.deadlines:
                self.deadlines[owner] = now + self.config.tool_deadline_min_s
            if owner in self.away:
                self.away[owner] = now  # back early, or on time: the next call is near
                yield from self._upload(owner, kv)
        elif event.kind == "agent.done":
            self.deciding.pop(owner, None)
            self.away.pop(owner, None)  # its host copy stays, evictable
            yield from self._end_reservation(owner)
            yield from self.next_use.expect(owner, None, now)

    def _tool_started(self, owner: Owner, started: float, predicted_s: float | None,
                      priority: float | None, kv: KVState, now: float) -> Decisions:
        """The decision on the KV of an agent whose tool started at `started` (see the table
        above); a reserved agent whose KV stays is reserved again."""
        decision = self._decide(owner, started, predicted_s, kv, now)
        self.decisions[decision] += 1
        self.last_decision[owner] = decision
        if decision == "offload":
            yield Offload(owner)
        elif priority is not None:
            yield Pin(owner)  # kept: reserved again, until the tool is long overdue
            self.reserved[owner] = priority
            self.deadlines[owner] = started + self._tool_deadline_s(predicted_s)

    def on_keyed(self, block_ids: list[int], kv: KVState) -> Decisions:
        if kv.has_host_tier and self.config.write_through:
            yield Backup(tuple(block_ids))

    def _tool_deadline_s(self, predicted_s: float | None) -> float:
        config = self.config
        return max(config.tool_deadline_factor * (predicted_s or 0.0), config.tool_deadline_min_s)

    def on_step(self, kv: KVState, now: float) -> Decisions:
        self._now = now
        yield from self._expire(now, kv)
        yield from self._fit_reservations(kv)
        for owner, (started, predicted_s, priority) in list(self.deciding.items()):
            if not _unsettled(owner, kv):
                del self.deciding[owner]
                yield from self._tool_started(owner, started, predicted_s, priority, kv, now)
        self._observe_tick(now)
        lead = self.tick_lead_s()
        for owner in [o for o in self.returns if o not in self.away]:
            del self.returns[owner]  # back already (an admission, agent.done): nothing to time
        for owner, upload_at in list(self.away.items()):
            if upload_at - lead <= now:
                yield from self._upload(owner, kv, self.returns.get(owner))
        yield from self.next_use.on_step(kv, now, self.away)

    def _observe_tick(self, now: float) -> None:
        if self._last_tick is not None:
            self._ticks.append(now - self._last_tick)
        self._last_tick = now

    def tick_lead_s(self) -> float:
        """How much earlier than `away` says an upload starts: the upload waits for the first
        tick past its time, and its landing for a tick after the copy ends, each up to one
        interval between ticks (the longest of the recent ones). 0 with `timed_upload_lead` off,
        or before two ticks."""
        if not self.config.timed_upload_lead or not self._ticks:
            return 0.0
        return 2 * max(self._ticks)

    def round_trip_s(self, num_blocks: int, kv: KVState) -> float:
        return 2 * self.copy_s(num_blocks, kv)

    def copy_s(self, num_blocks: int, kv: KVState) -> float:
        return self.config.copy_latency_s + kv.copy_seconds(num_blocks,
                                                             self.config.prior_bandwidth)

    def _decide(self, owner: Owner, started: float, predicted_s: float | None, kv: KVState,
                now: float) -> str:
        if not kv.has_host_tier:
            return "keep:no_host_tier"
        cached = kv.cached_blocks(owner)
        if not cached:
            return "keep:nothing_cached"
        usage = kv.usage()
        if usage.free >= self.config.pressure_free_fraction * usage.total:
            return "keep:no_pressure"
        left_s = (predicted_s or 0.0) - (now - started)
        if left_s < self.config.offload_margin * self.round_trip_s(cached, kv):
            return "keep:short_tool"
        if not kv.offloadable_blocks(owner):
            return "keep:host_full"
        self.returns[owner] = started + (predicted_s or 0.0)
        self.away[owner] = self.returns[owner] - self.copy_s(cached, kv) - self.config.upload_lead_s
        return "offload"

    def _upload(self, owner: Owner, kv: KVState, due: float | None = None) -> Decisions:
        """Brings the agent's KV back ahead of its next call if the device can spare the room:
        afterwards, at least `pressure_free_fraction` of the pool must still be free or merely
        cached, or the upload would take the blocks that running calls grow into (and preempt
        them) for KV that may wait idle. Tried again at each step meanwhile; once the next call
        comes, its admission uploads on demand, when the call can run (on_admit ends it).
        `due`: the predicted return a planned upload aims at (the engine times its landing);
        None: it is wanted now (the tool returned), and stays so on the retries."""
        if due is None:
            self.returns.pop(owner, None)
        if owner not in self.away or kv.is_offload_landing(owner):
            return  # the offload has not landed yet
        usage, wanted = kv.usage(), kv.offloaded_blocks(owner)
        if usage.free + usage.cached - wanted < self.config.pressure_free_fraction * usage.total:
            return
        del self.away[owner]
        self.returns.pop(owner, None)
        yield Upload(owner, due)


def due_in(call: Call) -> float:
    """Predicted seconds until the call's run needs it done: the run's remaining critical path
    plus the agent's slack off it (remaining x (1 - priority); none on the critical path). An
    unattributed call is a run of one call: 0."""
    remaining = call.remaining_s or 0.0
    return remaining * (2.0 - min(max(call.priority, 0.0), 1.0))


def _unsettled(owner: Owner, kv: KVState) -> bool:
    """Whether the owner's KV is between states: only write-through copies hold it, or a
    prefetch is bringing it up."""
    return bool(kv.arriving_blocks(owner)
                or (not kv.cached_blocks(owner) and kv.settling_blocks(owner)))
