"""`RayReplica`: the front daemon's handle on one engine replica in a Ray actor (ray_actor.py).

It implements the Replica protocol (replica.py). `start()` creates the actor and returns at
once; a watcher task waits for the actor's `ready()`, then polls its `snapshot()` every
SNAPSHOT_EVERY_S, so that stats(), kv_residency() and recent_decisions() answer synchronously
from the last one. The queue it reports (`load()`) is counted here, on the front's loop.

    state      when
    ---------  ------------------------------------------------------------------------
    starting   the actor is loading (its constructor runs), or Ray restarts it
    ready      ready() answered; the ReplicaSet routes calls to it
    down       a Ray actor error under a call, a snapshot or ready(); Ray restarts the
               actor (max_restarts=-1): once ready() answers from a new incarnation
               (the constructor ran again), restarts += 1 and it is ready again

A call in flight when the actor dies fails with ReplicaUnavailable (a 503 with Retry-After); its
KV is lost with the actor. Calls are never retried by Ray (max_task_retries=0): a retried
generate() would replay tokens the client already has.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import (
    AgentEvent,
    AgentResidency,
    EngineError,
    EngineLoad,
    EngineStats,
    GenerateOutput,
    GenerateRequest,
    RecentDecisions,
    ReplicaState,
    ReplicaStatus,
    ReplicaUnavailable,
)
from kvrt.runtime.engine.queue_meter import QueueMeter
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.replicas.ray_actor import (
    RemoteError,
    ReplicaActor,
    ReplicaInfo,
    Snapshot,
    StopReport,
)

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.25
RETRY_AFTER_S = 3  # what a caller of a dead replica is told: Ray restarts it in about that
_READY_RETRY_S = 0.5  # between ready() tries while the actor is down
_STOP_TIMEOUT_S = 30.0  # for the actor's engine to stop (in-flight work fails) before the kill
_NO_STATS = EngineStats(running=0, waiting=0, kv_blocks_total=0, kv_blocks_in_use=0,
                        kv_blocks_cached=0, prefix_queries_tokens=0, prefix_hits_tokens=0,
                        prompt_tokens=0, generation_tokens=0, preemptions=0)

T = TypeVar("T")


class RayReplica:
    """`resources`: the actor's Ray resources (num_gpus / num_cpus); `threads`: torch's threads
    in the actor when it runs on the CPU. The model facts are the front's (runtime/model/
    facts.py), read without the weights."""

    def __init__(self, name: str, config: EngineConfig, *, model_name: str, max_model_len: int,
                 tokenizer: Tokenizer, vocab_size: int, resources: Mapping[str, float],
                 threads: int | None = None, log_level: str = "info") -> None:
        self.name = name
        self.model_name, self.max_model_len = model_name, max_model_len
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._config, self._resources, self._threads = config, dict(resources), threads
        self._log_level = log_level
        self._actor: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._state: ReplicaState = "starting"
        self._info: ReplicaInfo | None = None
        self._snapshot: Snapshot | None = None
        self._queue = QueueMeter()
        self._in_flight = 0
        self._restarts = 0
        self._pending: set[asyncio.Future[Any]] = set()  # fire-and-forget calls, kept alive

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        import ray

        actor_class = ray.remote(ReplicaActor)
        self._actor = actor_class.options(
            max_restarts=-1, max_task_retries=0, **self._resources
        ).remote(self._config, self.model_name, self._threads, self._log_level, os.getcwd())
        self._watcher = asyncio.ensure_future(self._watch())
        self._watcher.add_done_callback(self._watch_ended)

    def _watch_ended(self, watcher: asyncio.Task[None]) -> None:
        if not watcher.cancelled() and watcher.exception() is not None:  # a bug: say so
            log.error("replica %s: its watcher failed; it is down from now on", self.name,
                      exc_info=watcher.exception())
            self._state = "down"

    async def stop(self) -> None:
        """Stops the actor's engine (what it left in its KV pool is logged here), then kills
        the actor."""
        import ray

        if self._watcher is not None:
            self._watcher.cancel()
        if self._actor is None:
            return
        report = None
        if self._state == "ready":
            try:
                report = await asyncio.wait_for(_awaited(self._actor.stop.remote()),
                                                _STOP_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as error:
                log.warning("replica %s did not stop cleanly: %s", self.name, error)
        ray.kill(self._actor, no_restart=True)
        self._state = "down"
        _log_stop(self.name, report)

    def state(self) -> ReplicaState:
        return self._state

    @property
    def restarts(self) -> int:
        return self._restarts

    def is_alive(self) -> bool:
        return self._state == "ready"

    def pid(self) -> int | None:
        """The actor's process id, as its latest ready() said."""
        return None if self._info is None else self._info.pid

    async def _watch(self) -> None:
        while True:
            info = await self._wait_ready()
            self._count_restart(info.incarnation)
            self._info = info
            self._set_state("ready")
            await self._poll()
            self._set_state("down")
            await asyncio.sleep(_READY_RETRY_S)

    async def _wait_ready(self) -> ReplicaInfo:
        import ray

        while True:
            call = asyncio.ensure_future(_awaited(self._actor.ready.remote()))
            done, _ = await asyncio.wait({call}, timeout=_READY_RETRY_S)
            if not done:  # Ray took the call: the actor is loading (again)
                self._set_state("starting")
            try:
                return await call
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it
                self._set_state("starting")
            except ray.exceptions.RayError as error:  # dead, or its constructor failed
                if self._state != "down":
                    log.warning("replica %s is down: %s", self.name, error)
                self._set_state("down")
            await asyncio.sleep(_READY_RETRY_S)

    async def _poll(self) -> None:
        """Takes snapshots until the actor fails (or a call saw it fail)."""
        import ray

        while self._state == "ready":
            try:
                snapshot: Snapshot = await _awaited(self._actor.snapshot.remote())
            except ray.exceptions.RayError:
                return
            self._count_restart(snapshot.incarnation)  # it died and came back between polls
            self._snapshot = snapshot
            await asyncio.sleep(SNAPSHOT_EVERY_S)

    def _count_restart(self, incarnation: str) -> None:
        if self._info is not None and incarnation != self._info.incarnation:
            self._restarts += 1
            self._info = replace(self._info, incarnation=incarnation)
            self._snapshot = None  # the old actor's figures are gone with it
            log.warning("replica %s came back after a restart (%d so far)", self.name,
                        self._restarts)

    def _set_state(self, state: ReplicaState) -> None:
        if state != self._state:
            log.info("replica %s: %s -> %s", self.name, self._state, state)
            self._state = state

    def _lost(self, error: BaseException) -> ReplicaUnavailable:
        log.warning("replica %s failed under a call: %s", self.name, type(error).__name__)
        self._set_state("down")
        return ReplicaUnavailable(f"replica {self.name} went down; retry in {RETRY_AFTER_S} s",
                                  RETRY_AFTER_S)

    def _unavailable(self) -> ReplicaUnavailable:
        return ReplicaUnavailable(f"replica {self.name} is {self._state}", RETRY_AFTER_S)

    # -- what the front reads, from the last snapshot ----------------------------------------

    def validate(self, request: GenerateRequest) -> None:
        if self._info is None:
            raise self._unavailable()
        self._info.limits.validate(request)

    def load(self) -> EngineLoad:
        queue = self._queue
        return EngineLoad(queue.requests, queue.tokens, self._in_flight, queue.drain_per_s())

    def stats(self) -> EngineStats:
        return _NO_STATS if self._snapshot is None else self._snapshot.stats

    def last_snapshot(self) -> Snapshot | None:
        return self._snapshot

    def served(self, run: str) -> int:
        """generate() calls of `run` the actor took, as its last snapshot says."""
        return 0 if self._snapshot is None else self._snapshot.served.get(run, 0)

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        return {} if self._snapshot is None else dict(self._snapshot.residency.get(run, {}))

    def recent_decisions(self) -> RecentDecisions:
        return RecentDecisions(0.0, ()) if self._snapshot is None else self._snapshot.decisions

    def replicas(self) -> list[ReplicaStatus]:
        return []

    def replica_of(self, run: str) -> list[str]:
        return []

    # -- calls -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        import ray

        if self._state != "ready":
            raise self._unavailable()
        self.validate(request)
        grammar = request.params.grammar
        wire = request if grammar is None else replace(
            request, params=replace(request.params, grammar=None))  # matchers do not pickle
        stream = self._actor.generate.options(num_returns="streaming").remote(
            wire, None if grammar is None else grammar.key)
        rid = request.request_id
        self._queue.enter(rid, len(request.prompt_token_ids))
        self._in_flight += 1
        finished, ended_choices = False, 0
        try:
            async for ref in stream:
                for item in await ref:
                    if isinstance(item, RemoteError):
                        finished = True
                        raise item.rebuild()
                    self._queue.leave(rid, served=True)
                    ended_choices += item.finish_reason is not None
                    finished = ended_choices == request.params.n
                    yield item
            finished = True
        except ray.exceptions.RayTaskError as error:  # a bug in the actor's generate
            finished = True
            raise EngineError(f"replica {self.name} failed: {error}") from None
        except ray.exceptions.RayError as error:  # the actor, or its process, went away
            finished = True
            raise self._lost(error) from None
        finally:
            self._queue.leave(rid, served=False)
            self._in_flight -= 1
            if not finished:  # the caller went away: the actor aborts the call, frees its KV
                ray.cancel(stream)

    async def abort_all(self, error: EngineError) -> int:
        return await self._call(0, "abort_all", error)

    async def release_run(self, run: str) -> int:
        # A replica that is down lost its KV: nothing of the run is left there to release.
        return await self._call(0, "release_run", run)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        await self._call(None, "wait_idle", timeout)

    async def check_integrity(self, timeout: float = 10.0) -> str | None:
        """Waits until the actor's engine is idle, then checks its KV pool: None if it holds,
        else why not."""
        return await self._call("the replica is not ready", "check_integrity", timeout)

    async def refresh(self) -> Snapshot | None:
        """Takes a snapshot now (rather than waiting for the next poll)."""
        snapshot = await self._call(None, "snapshot")
        if snapshot is not None:
            self._snapshot = snapshot
        return self._snapshot

    def notify(self, event: AgentEvent) -> None:
        self._tell("notify", event)

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        self._tell("set_priorities", run, dict(priorities))

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        self._tell("set_outlook", run, remaining_s, dict(next_use))

    def sample_shared_text(self) -> None:
        self._tell("sample_shared_text")

    async def _call(self, if_down: T, method: str, *args: Any) -> T:
        """A call that waits for its answer; `if_down` when the actor is not there."""
        import ray

        if self._state != "ready":
            return if_down
        try:
            return await _awaited(getattr(self._actor, method).remote(*args))
        except ray.exceptions.RayTaskError as error:  # a bug in the actor's method
            raise EngineError(f"replica {self.name} failed in {method}: {error}") from None
        except ray.exceptions.RayError as error:
            self._lost(error)
            return if_down

    def _tell(self, method: str, *args: Any) -> None:
        """Fire and forget, in order with the other calls; dropped while the actor is down
        (its policy state went with it)."""
        if self._state != "ready":
            return
        done = asyncio.ensure_future(_quietly(getattr(self._actor, method).remote(*args)))
        self._pending.add(done)
        done.add_done_callback(self._pending.discard)


def _log_stop(name: str, report: StopReport | None) -> None:
    if report is None:
        log.info("replica %s stopped (it was not serving)", name)
    elif report.broken is not None:
        log.error("replica %s stopped; its KV pool is inconsistent: %s", name, report.broken)
    elif report.held:
        log.error("replica %s stopped; %d KV blocks are still held by requests", name,
                  report.held)
    else:
        log.info("replica %s stopped; all request KV released (%d blocks cached, %d pinned)",
                 name, report.cached, report.pinned)


async def _awaited(ref: Awaitable[T]) -> T:
    return await ref


async def _quietly(ref: Awaitable[Any]) -> None:
    """Awaits a fire-and-forget call so that Ray does not log its error as unhandled."""
    import ray

    try:
        await ref
    except ray.exceptions.RayError:
        pass
