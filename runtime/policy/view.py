"""What a policy sees: an agent's event, a call (waiting or running) and the KV, through small
queries.

A policy never reads the block pool, the tables or the mover: these protocols are all it gets,
and the engine's AgentEvent, Sequence and KV manager implement them.
"""

from __future__ import annotations

from typing import Protocol

from kvrt.runtime.kv.block_pool import PoolUsage
from kvrt.runtime.kv.owners import Owner


class Event(Protocol):
    @property
    def kind(self) -> str: ...  # tool_call.started, tool_call.finished, agent.done

    @property
    def run(self) -> str: ...

    @property
    def agent(self) -> str: ...

    @property
    def predicted_s(self) -> float | None: ...  # a started tool call's expected seconds


class Call(Protocol):
    @property
    def arrival(self) -> float: ...  # the engine's clock when it arrived

    @property
    def order(self) -> int: ...  # arrivals counted: breaks ties of `arrival`

    @property
    def priority(self) -> float: ...  # its agent's graph priority, as last pushed (or stamped)

    @property
    def remaining_s(self) -> float | None: ...  # its run's remaining critical path (seconds)

    @property
    def owner(self) -> Owner | None: ...  # (run, agent); None: unattributed


class KVState(Protocol):
    """The device pool, and per owner (run, agent): counts, never block ids."""

    def usage(self) -> PoolUsage: ...

    def num_pinned(self) -> int: ...  # distinct blocks at least one owner pins

    def is_pinned(self, owner: Owner) -> bool: ...

    def pinnable_blocks(self, owner: Owner) -> int: ...  # keyed, not on its way to the host

    def cached_blocks(self, owner: Owner) -> int: ...  # no request reads them
    def settling_blocks(self, owner: Owner) -> int: ...  # cached once its backups land
    def arriving_blocks(self, owner: Owner) -> int: ...  # on their way up: a prefetch

    @property
    def has_host_tier(self) -> bool: ...

    def offloadable_blocks(self, owner: Owner) -> int: ...  # what an Offload would move now

    def offloaded_blocks(self, owner: Owner) -> int: ...  # what its last Offload sent

    def is_offload_landing(self, owner: Owner) -> bool: ...  # ... and it is still copying

    def retention_of(self, owner: Owner) -> int: ...  # its level, as last Retain-ed (or 2)

    def prefetchable_blocks(self, owner: Owner) -> int: ...  # what a Prefetch would move now

    def copy_seconds(self, num_blocks: int, prior_bandwidth: float) -> float:
        """Seconds to copy that many blocks between the tiers, at the bandwidth observed so far
        (`prior_bandwidth`, bytes per second, before the first copy)."""
        ...
