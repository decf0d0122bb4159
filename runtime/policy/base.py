"""Scheduling policies are plug-ins chosen by name (`--policy`).

A policy decides two orders:
- `admission_key(seq)`: waiting sequences are admitted in ascending key order;
- `victim(running)`: which running sequence gives its blocks back when the pool runs dry
  (preempting a sequence is always safe: it is recomputed later, from cached prefix blocks
  where they survive).
Eviction of unreferenced cached blocks is LRU inside the block pool. Between calls, an agent's
KV is the policy's to keep: the hooks below let it see the agents' tool calls and pin their KV.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvrt.runtime.policy.config import ReuseConfig

if TYPE_CHECKING:
    from kvrt.runtime.engine.protocol import AgentEvent
    from kvrt.runtime.engine.sequence import Sequence
    from kvrt.runtime.engine.tier_moves import TierMoves
    from kvrt.runtime.kv.manager import KVManager

_REGISTRY: dict[str, Callable[[], Policy]] = {}


class Policy(ABC):
    """The orders are abstract; the hooks are optional and do nothing by default (as `lru`).

    hook                       called by the ... when
    -------------------------  -------------------------------------------------------------
    on_event(event, kv, now)   engine     the control plane applied an agent's event
                                          (tool_call.started / .finished, agent.done; never a
                                          duplicate)
    on_admit(seq, kv)          scheduler  it admits `seq` (first time, or after a preemption),
                                          after the sequence adopted its prefix and grew: its
                                          own references now protect the blocks it reads
    on_finish(seq, kv)         engine     `seq` finished and released its blocks (its full
                                          ones now sit cached)
    on_keyed(block_ids, kv)    engine     a step filled these device blocks with computed KV
                                          and keyed them (findable, never written again)
    on_step(kv, now)           engine     before each step, and every ~50 ms while idle (the
                                          engine thread's idle wait), so expiries happen even
                                          when no request comes
    on_run_end(run)            engine     the run ended: its pins and KV are gone already; forget
                                          any state kept for its agents
    on_stall(kv, now)          engine     it has work but scheduled nothing this step: blocks
                                          no live sequence reads (pins) hold the pool

    Contract:
    - Hooks run on the engine thread, between steps. They may `kv.pin` / `kv.unpin` an owner
      (run, agent); they never allocate or free a sequence's blocks.
    - Releasing a pin early is always safe (the KV stays cached, merely evictable again). A
      policy that pins must release at least one pin per `on_stall` while it holds any, or the
      engine turns over without progress until the pins expire.
    - Ending a run drops its agents' pins in the KV manager itself (`KVManager.release_run`);
      a policy that keeps per-pin state sees it there (`kv.is_pinned`), no hook says so.
    - `now` is the engine's clock in seconds (a simulated one under `kvrt sim`).
    - `moves` (set by the engine; None without a host tier) lets a policy offload an agent's
      cached KV to the host and upload it back (runtime/engine/tier_moves.py).
    """

    name: str
    moves: TierMoves | None = None
    reuse: ReuseConfig = ReuseConfig()  # position-independent reuse: off unless a policy says

    @abstractmethod
    def admission_key(self, seq: Sequence) -> tuple: ...

    @abstractmethod
    def victim(self, running: list[Sequence]) -> Sequence: ...

    def on_event(self, event: AgentEvent, kv: KVManager, now: float) -> None:  # noqa: B027
        pass

    def on_admit(self, seq: Sequence, kv: KVManager) -> None:  # noqa: B027
        pass

    def kv_decisions(self) -> dict[str, int]:
        """Counts of the policy's decisions on agents' KV (for metrics); none by default."""
        return {}

    def kv_decisions_of(self, run: str) -> dict[str, str]:
        """Agent -> the last decision on its KV (for the run state); none by default. Called
        from the server's thread."""
        return {}

    def on_finish(self, seq: Sequence, kv: KVManager) -> None:  # noqa: B027
        pass

    def on_run_end(self, run: str) -> None:  # noqa: B027
        pass

    def on_keyed(self, block_ids: list[int], kv: KVManager) -> None:  # noqa: B027
        pass

    def on_step(self, kv: KVManager, now: float) -> None:  # noqa: B027
        pass

    def on_stall(self, kv: KVManager, now: float) -> None:  # noqa: B027
        pass


def register_policy(name: str):
    def add(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str) -> Policy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(policy_names())}")
    return _REGISTRY[name]()
