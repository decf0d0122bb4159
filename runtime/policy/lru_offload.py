"""`lru-offload`: `lru` with every computed block also copied to the host tier, so an eviction
or a preemption on the device loses nothing the next call cannot upload. This is what a vLLM
server with a CPU offloading connector (or LMCache) does: the strongest baseline that knows
nothing of the agent graph. Without a host tier it is `lru`."""

from __future__ import annotations

from kvrt.runtime.policy.base import Decisions, register_policy
from kvrt.runtime.policy.decisions import Backup
from kvrt.runtime.policy.lru import LRUPolicy
from kvrt.runtime.policy.view import KVState


@register_policy("lru-offload")
class LRUOffloadPolicy(LRUPolicy):
    def on_keyed(self, block_ids: list[int], kv: KVState) -> Decisions:
        if kv.has_host_tier:
            yield Backup(tuple(block_ids))
