"""`ttl`: keep an agent's KV pinned while it waits on a tool, for a time-to-live derived from the
predicted tool time, as Continuum does. Admission and victims are lru's (first come, first
served).

On `tool_call.started` the agent's KV (the keyed blocks it holds now, cached or in use) is
pinned until `now + ttl`:

    prediction            ttl
    --------------------  -----------------------------------------
    predicted_s > 0       min(predicted_s * TTL_MARGIN, TTL_MAX_S)
    None or 0             TTL_DEFAULT_S  (0 is the control plane's "never declared nor seen")

A second start while pinned (parallel tool calls) pins what the agent came to hold since and
keeps the later expiry. The pin ends at the first of:
- its expiry (`on_step`: before each engine step, and every ~50 ms while the engine is idle);
- the agent's next call is admitted (`on_admit`: its own references now protect what it reuses);
- `agent.done`;
- the run ends (the KV manager drops the run's pins itself);
- a stall (`on_stall`): the engine has work and could schedule nothing, because pins hold the
  pool. The pin expiring first is released, one per stalled step, until work fits, so a pin
  never deadlocks the engine. `tool_call.finished` changes nothing: the next call is near.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvrt.runtime.policy.base import register_policy
from kvrt.runtime.policy.lru import LRUPolicy

if TYPE_CHECKING:
    from kvrt.runtime.engine.protocol import AgentEvent
    from kvrt.runtime.engine.sequence import Sequence
    from kvrt.runtime.kv.manager import KVManager
    from kvrt.runtime.kv.owners import Owner

TTL_MARGIN = 1.5  # pin for this many times the predicted tool time: tools run late
TTL_MAX_S = 60.0  # and never longer than this: a long tool must not hold the pool for long
TTL_DEFAULT_S = 5.0  # a tool call nobody predicted


def ttl_seconds(predicted_s: float | None) -> float:
    if predicted_s is None or predicted_s <= 0:
        return TTL_DEFAULT_S
    return min(predicted_s * TTL_MARGIN, TTL_MAX_S)


@register_policy("ttl")
class TTLPolicy(LRUPolicy):
    def __init__(self) -> None:
        self.expiries: dict[Owner, float] = {}  # pinned owner -> clock time its pin ends

    def on_event(self, event: AgentEvent, kv: KVManager, now: float) -> None:
        owner = (event.run, event.agent)
        if event.kind == "tool_call.started":
            # A record whose pin the KV manager dropped (run ended) no longer counts.
            until = self.expiries.get(owner, now) if kv.is_pinned(owner) else now
            kv.pin(owner)
            if kv.is_pinned(owner):  # an agent holding no KV yet has nothing to pin
                self.expiries[owner] = max(until, now + ttl_seconds(event.predicted_s))
        elif event.kind == "agent.done":
            self._release(owner, kv)

    def on_admit(self, seq: Sequence, kv: KVManager) -> None:
        owner = seq.table.owner
        if owner is not None and owner in self.expiries:
            self._release(owner, kv)

    def on_step(self, kv: KVManager, now: float) -> None:
        for owner, until in list(self.expiries.items()):
            if until <= now or not kv.is_pinned(owner):
                self._release(owner, kv)

    def on_stall(self, kv: KVManager, now: float) -> None:
        if self.expiries:
            self._release(min(self.expiries, key=self.expiries.__getitem__), kv)

    def _release(self, owner: Owner, kv: KVManager) -> None:
        self.expiries.pop(owner, None)
        kv.unpin(owner)
