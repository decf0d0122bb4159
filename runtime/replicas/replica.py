"""One engine replica as the front daemon's ReplicaSet drives it (`kvrt serve --replicas N`).

A replica is an engine with a name and a state. `AsyncEngine` is one as it is (a replica in
this process: `kvrt sim --replicas`, and tests); `RayReplica` (ray_replica.py) is an engine in a
Ray actor. The ReplicaSet routes each call to one replica and sends each run's control messages
(events, priorities, outlook, release) to the replicas holding its agents.

Contract beyond EngineClient's:
    start()       returns promptly: a replica that takes long to load does not hold the front
                  daemon; it is "starting" until it can serve, then "ready"
    state()       "starting", "ready" or "down" (died; Ray restarts it: "starting" again)
    generate()    a replica that dies under a call fails it with ReplicaUnavailable
    stats(), kv_residency(), recent_decisions(), load()
                  cheap and synchronous: a remote replica answers from what it last reported
"""

from __future__ import annotations

from typing import Protocol

from kvrt.runtime.engine.protocol import ReplicaState
from kvrt.runtime.server.app_keys import ManagedEngine


class Replica(ManagedEngine, Protocol):
    def state(self) -> ReplicaState: ...

    @property
    def restarts(self) -> int: ...

    def sample_shared_text(self) -> None: ...

    async def wait_idle(self, timeout: float = 10.0) -> None: ...
