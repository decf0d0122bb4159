"""`ttl`: keep an agent's KV pinned while it waits on a tool, for a time-to-live derived from the
predicted tool time, as Continuum does. Admission and victims are lru's (first come, first
served).

On `tool_call.started` the agent's KV (the keyed blocks it holds now, cached or in use) is
pinned until `now + ttl` (parameters: TTLConfig in runtime/policy/config.py):

    prediction            ttl
    --------------------  -----------------------------------------
    predicted_s > 0       min(predicted_s * margin, max_s)
    None or 0             default_s  (0 is the control plane's "never declared nor seen")

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

from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.policy.base import Decisions, register_policy
from kvrt.runtime.policy.config import TTLConfig
from kvrt.runtime.policy.decisions import Pin, Unpin
from kvrt.runtime.policy.lru import LRUPolicy
from kvrt.runtime.policy.view import Call, Event, KVState

_DEFAULTS = TTLConfig()


def ttl_seconds(predicted_s: float | None, config: TTLConfig = _DEFAULTS) -> float:
    if predicted_s is None or predicted_s <= 0:
        return config.default_s
    return min(predicted_s * config.margin, config.max_s)


@register_policy("ttl")
class TTLPolicy(LRUPolicy):
    options = (TTLConfig,)

    def __init__(self, config: TTLConfig | None = None) -> None:
        self.config = config or TTLConfig()
        self.expiries: dict[Owner, float] = {}  # pinned owner -> clock time its pin ends

    def on_event(self, event: Event, kv: KVState, now: float) -> Decisions:
        owner = (event.run, event.agent)
        if event.kind == "tool_call.started":
            # A record whose pin the KV manager dropped (run ended) no longer counts.
            until = self.expiries.get(owner, now) if kv.is_pinned(owner) else now
            yield Pin(owner)
            if kv.is_pinned(owner):  # an agent holding no KV yet has nothing to pin
                self.expiries[owner] = max(until, now + ttl_seconds(event.predicted_s,
                                                                    self.config))
        elif event.kind == "agent.done":
            yield from self._release(owner)

    def on_admit(self, call: Call, kv: KVState) -> Decisions:
        owner = call.owner
        if owner is not None and owner in self.expiries:
            yield from self._release(owner)

    def on_step(self, kv: KVState, now: float) -> Decisions:
        for owner, until in list(self.expiries.items()):
            if until <= now or not kv.is_pinned(owner):
                yield from self._release(owner)

    def on_stall(self, kv: KVState, now: float) -> Decisions:
        if self.expiries:
            yield from self._release(min(self.expiries, key=self.expiries.__getitem__))

    def _release(self, owner: Owner) -> Decisions:
        self.expiries.pop(owner, None)
        yield Unpin(owner)
