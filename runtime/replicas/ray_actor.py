"""The engine replica's side of `kvrt serve --replicas N`: an AsyncEngine in a Ray actor.

`ReplicaActor` is a plain class; the front side (ray_replica.py) makes it a Ray actor with
`ray.remote(ReplicaActor)`, so this module imports no Ray. The actor builds the engine in its
constructor (the blocking load is fine there: Ray answers no call before it ends) and starts it
on the actor's event loop at the first call. What crosses to the front:

    ready()      ReplicaInfo: what the front checks requests against, and who answered
    generate()   batches of GenerateOutput (what queued since the last batch: Ray's cost is
                 per item), an engine error as a value (RemoteError), never raised
    snapshot()   Snapshot: stats, decisions, residency and calls served per run, every ~0.25 s
    the rest     as EngineClient's verbs say (fire-and-forget ones return nothing)

A restarted actor (Ray runs the constructor again) has a new `incarnation`; the front counts
restarts from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.engine import RequestLimits
from kvrt.runtime.engine.protocol import (
    AgentEvent,
    AgentResidency,
    EngineError,
    EngineStats,
    GenerateRequest,
    RecentDecisions,
    StepFailed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What never changes while the actor lives."""

    model_name: str
    limits: RequestLimits  # the front validates requests against them, with no round trip
    incarnation: str  # new each time the constructor runs (a Ray restart)
    pid: int
    device: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    incarnation: str  # ReplicaInfo's: a change says the actor restarted since the last one
    stats: EngineStats
    decisions: RecentDecisions
    residency: dict[str, dict[str, AgentResidency]]  # run -> its agents' (runs it holds)
    # run -> generate() calls this actor took for it (live runs; "": calls without a run)
    served: dict[str, int]


@dataclass(frozen=True, slots=True)
class StopReport:
    held: int  # KV blocks still held by requests: 0 when all were released
    cached: int
    pinned: int
    broken: str | None  # why the KV pool's integrity check failed; None: it holds


@dataclass(frozen=True, slots=True)
class RemoteError:
    """An engine error, as it crosses to the front: some EngineErrors (StepFailed) do not
    pickle through their args, so the class and the fields the front needs cross instead."""

    kind: type[EngineError]
    message: str
    request_ids: tuple[str, ...] = ()  # StepFailed's

    @classmethod
    def of(cls, error: BaseException) -> RemoteError:
        if isinstance(error, StepFailed):
            return cls(StepFailed, str(error), tuple(error.request_ids))
        if isinstance(error, EngineError):
            return cls(type(error), str(error))
        return cls(EngineError, f"the replica failed: {type(error).__name__}: {error}")  # a bug

    def rebuild(self) -> EngineError:
        if self.kind is StepFailed:
            return StepFailed(self.message, list(self.request_ids))
        try:
            return self.kind(self.message)
        except TypeError:  # an error class that needs more than its message
            return EngineError(self.message)


_END = object()  # the pump's end of stream


def _search_last(folder: str) -> None:
    """Ray puts the driver's working directory first on its workers' sys.path. Run from a kvrt
    checkout, its `kernels/` folder (kvrt.kernels) would shadow the `kernels` distribution
    that transformers imports: the folder goes last, as the daemon itself has it."""
    if folder in sys.path:
        sys.path.remove(folder)
        sys.path.append(folder)


class ReplicaActor:
    """`threads`: torch's intra-op threads when the engine runs on the CPU (None: torch's
    default). `grammar` of generate(): the source a front compiled (llguidance matchers do not
    pickle); the actor compiles it again for its own tokenizer, once per source."""

    def __init__(self, config: EngineConfig, served_model_name: str | None,
                 threads: int | None = None, log_level: str = "info",
                 driver_dir: str | None = None) -> None:
        if driver_dir is not None:
            _search_last(driver_dir)
        import torch

        from kvrt.runtime.engine.factory import resolve_device

        # The actor's stderr reaches the daemon's log through Ray (prefixed with the actor).
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        device = resolve_device(config.device)
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        self._engine = AsyncEngine.create(config, served_model_name)
        self._info = ReplicaInfo(self._engine.model_name, self._engine.engine.limits,
                                 uuid.uuid4().hex, os.getpid(), str(device))
        self._started = False
        self._served: Counter[str] = Counter()
        self._grammars: Any = None  # server/grammars.py's Grammars, made on first use

    async def _start(self) -> None:
        if not self._started:  # on the actor's event loop: the constructor runs off it
            self._started = True
            await self._engine.start()

    async def ready(self) -> ReplicaInfo:
        await self._start()
        return self._info

    def pid(self) -> int:
        return os.getpid()

    async def generate(self, request: GenerateRequest,
                       grammar: str | None = None) -> AsyncIterator[list[Any]]:
        """Yields lists of GenerateOutput; a failure is the last item, as a RemoteError.
        Cancelled (the front's caller went away), it aborts the request: its KV is freed."""
        await self._start()
        if grammar is not None:
            request = replace(request, params=replace(request.params,
                                                      grammar=self._compile(grammar)))
        self._served[request.attribution.run or ""] += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.ensure_future(self._pump(request, queue))
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                done = batch[-1] is _END or isinstance(batch[-1], RemoteError)
                if batch[-1] is _END:
                    batch.pop()
                if batch:
                    yield batch
                if done:
                    return
        finally:
            pump.cancel()  # closes the engine's stream early: the engine aborts the request

    async def _pump(self, request: GenerateRequest, queue: asyncio.Queue[Any]) -> None:
        try:
            async for output in self._engine.generate(request):
                queue.put_nowait(output)
        except Exception as error:  # delivered as a value: Ray would wrap it
            queue.put_nowait(RemoteError.of(error))
            return
        queue.put_nowait(_END)

    def _compile(self, grammar: str) -> Any:
        from kvrt.runtime.server.grammars import Grammars

        if self._grammars is None:
            self._grammars = Grammars(self._engine)
        return self._grammars.compile(grammar, "grammar")

    async def notify(self, event: AgentEvent) -> None:
        await self._start()
        self._engine.notify(event)

    async def set_priorities(self, run: str, priorities: dict[str, float]) -> None:
        await self._start()
        self._engine.set_priorities(run, priorities)

    async def set_outlook(self, run: str, remaining_s: float,
                          next_use: dict[str, float | None]) -> None:
        await self._start()
        self._engine.set_outlook(run, remaining_s, next_use)

    async def sample_shared_text(self) -> None:
        await self._start()
        self._engine.sample_shared_text()

    async def release_run(self, run: str) -> int:
        await self._start()
        self._served.pop(run, None)
        return await self._engine.release_run(run)

    async def abort_all(self, error: EngineError) -> int:
        await self._start()
        return await self._engine.abort_all(error)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        await self._start()
        await self._engine.wait_idle(timeout)

    async def snapshot(self) -> Snapshot:
        await self._start()
        engine = self._engine
        residency = {run: engine.kv_residency(run) for run in self._served if run}
        return Snapshot(self._info.incarnation, engine.stats(), engine.recent_decisions(),
                        {run: agents for run, agents in residency.items() if agents},
                        dict(self._served))

    async def check_integrity(self, timeout: float = 10.0) -> str | None:
        """Waits until idle, then checks the KV pool: None if consistent, else why not."""
        await self.wait_idle(timeout)
        try:
            self._engine.engine.check_integrity()
        except AssertionError as error:
            return str(error) or "integrity check failed"
        return None

    async def stop(self) -> StopReport | None:
        """Stops the engine (what is live fails) and says what it left: the front logs it
        (the actor's own log may not reach the daemon's before Ray is shut down)."""
        if not self._started:
            return None
        await self._engine.stop()
        stats = self._engine.engine.stats()
        try:
            self._engine.engine.check_integrity()
            broken = None
        except AssertionError as error:
            broken = str(error) or "integrity check failed"
        return StopReport(stats.kv_blocks_in_use - stats.kv_blocks_pinned,
                          stats.kv_blocks_cached, stats.kv_blocks_pinned, broken)
