"""Runs the engine off the event loop and gives the asyncio side an async interface.

The event loop never runs torch. `AsyncEngine` is the loop's side: it sends commands (add,
abort, notify, set_priorities, set_outlook, release_run) to the engine's worker
(runtime/engine/worker.py) and hands each live request's outputs to its stream, one
asyncio.Queue per request. A driver runs the worker: `ThreadDriver`, the engine thread (while
it has no work, it wakes at least every IDLE_WAIT_S and ticks the engine, so the policy's
timers run between calls too); kvrt sim passes its own, which steps the engine on simulated
time (runtime/sim/driver.py). The loop side also counts what waits for the engine (`load`:
queued requests and tokens, the drain rate) for the server's admission control. """

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine, RunRelease
from kvrt.runtime.engine.factory import build_engine
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
    RunEnded,
)
from kvrt.runtime.engine.queue_meter import QueueMeter
from kvrt.runtime.engine.worker import Delivery, EngineWorker, settle

log = logging.getLogger(__name__)


class Driver(Protocol):
    """Runs an EngineWorker: applies its commands, steps while it has work, ticks while idle,
    and shuts it down (worker.shut_down) when stopped or when it fails."""

    def start(self, worker: EngineWorker) -> None: ...  # on the event loop

    async def stop(self) -> None: ...  # returns once the worker has shut down

    def is_alive(self) -> bool: ...

    def wake(self) -> None: ...  # a command was sent

    async def wait_idle(self, timeout: float) -> None: ...


class ThreadDriver:
    """The engine thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._worker: EngineWorker | None = None

    def start(self, worker: EngineWorker) -> None:
        self._worker = worker
        self._thread = threading.Thread(target=self._run, args=(worker,), name="kvrt-engine",
                                        daemon=True)
        self._thread.start()

    def _run(self, worker: EngineWorker) -> None:
        engine = worker.engine
        try:
            while not worker.stopping.is_set():
                worker.handle_commands(block=not engine.has_work())
                if engine.has_work():
                    worker.post(worker.step())  # the policy ticks first
                    if engine.waits_on_moves():
                        worker.wait_for_landing()
                else:
                    worker.tick()
        finally:  # stopping, or a bug escaped: no stream may wait forever
            worker.shut_down()

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.stopping.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        pass  # the thread waits on the inbox itself

    async def wait_idle(self, timeout: float) -> None:
        worker = self._worker
        if worker is None:
            return
        worker.idle.clear()
        if not worker.send("ping", None):
            return  # no engine thread: nothing is in flight
        await asyncio.get_running_loop().run_in_executor(None, worker.idle.wait, timeout)


class AsyncEngine:
    """Implements `EngineClient` (runtime/engine/protocol.py). `driver`: what runs the engine
    (default: its own thread)."""

    def __init__(self, engine: Engine, model_name: str, driver: Driver | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size  # the logits' width (grammars are compiled for it)
        self.driver = driver or ThreadDriver()
        self._worker: EngineWorker | None = None  # made on the loop, at start
        self._streams: dict[str, asyncio.Queue[GenerateOutput | BaseException]] = {}
        self._queue = QueueMeter()  # touched on the loop only
        self.restarts = 0  # as a replica (runtime/replicas/replica.py): one in-process never is

    @classmethod
    def create(cls, config: EngineConfig, served_model_name: str | None = None) -> AsyncEngine:
        """Loads the model and builds the engine (blocking: call it off the event loop)."""
        engine, checkpoint = build_engine(config)
        return cls(engine, served_model_name or checkpoint.name)

    async def start(self) -> None:
        self._worker = EngineWorker(self.engine, asyncio.get_running_loop(), self)
        self.driver.start(self._worker)

    async def stop(self) -> None:
        """Stops the driver (failing what is live), then checks and logs that every request's
        KV was released and the pool is consistent."""
        if self._worker is not None:
            await self.driver.stop()
            self._check_released()

    def _check_released(self) -> None:
        stats = self.engine.stats()
        held = stats.kv_blocks_in_use - stats.kv_blocks_pinned
        try:
            self.engine.check_integrity()
        except AssertionError as error:
            log.error("engine stopped; the KV pool is inconsistent: %s", error)
            return
        if held:
            log.error("engine stopped; %d KV blocks are still held by requests", held)
        else:
            log.info("engine stopped; all request KV released (%d blocks cached, %d pinned)",
                     stats.kv_blocks_cached, stats.kv_blocks_pinned)

    def is_alive(self) -> bool:
        return self.driver.is_alive()

    def state(self) -> ReplicaState:
        """As a replica of a ReplicaSet (runtime/replicas/replica_set.py) sees it."""
        if self._worker is None:
            return "starting"
        return "ready" if self.is_alive() else "down"

    def replicas(self) -> list[ReplicaStatus]:
        return []  # one engine

    def replica_of(self, run: str) -> list[str]:
        return []

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def validate(self, request: GenerateRequest) -> None:
        self.engine.validate(request)  # reads only what never changes: safe off the thread

    def load(self) -> EngineLoad:
        queue = self._queue
        return EngineLoad(queue.requests, queue.tokens, len(self._streams), queue.drain_per_s())

    async def abort_all(self, error: EngineError) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._send("abort_all", (error, future)):
            return 0  # no engine thread: its shutdown failed whatever was live
        return await future

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        return self.engine.kv_residency(run)  # the ledger locks: no trip to the engine thread

    def recent_decisions(self) -> RecentDecisions:
        return self.engine.decisions.recent()  # the log locks: no trip to the engine thread

    def notify(self, event: AgentEvent) -> None:
        self._send("notify", event)  # with the engine down there is no policy left to tell

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        self._send("set_priorities", (run, dict(priorities)))  # a copy: the caller keeps its dict

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        self._send("set_outlook", (run, remaining_s, dict(next_use)))

    def sample_shared_text(self) -> None:
        """Has the engine sample the blocks its live agents hold for shared text, between two
        steps (it owns the block tables), into `stats().shared_text_blocks_per_agent`. Fire and
        forget, like `notify`."""
        self._send("sample_shared_text", None)

    async def release_run(self, run: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._send("release_run", (run, future)):
            if self._worker is not None:  # closing: let it finish before touching the engine
                await self.driver.stop()
            # No engine running (never started, or gone): nobody else touches the engine now.
            self.ended(run, self.engine.release_run(run), future)
        return await future

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until the engine has no work and has handled every command sent."""
        if self.is_alive():
            await self.driver.wait_idle(timeout)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """The engine validates the request as it adds it: a bad one fails here before any
        output, as RequestRejected."""
        stream: asyncio.Queue[GenerateOutput | BaseException] = asyncio.Queue()
        self._streams[request.request_id] = stream
        if not self._send("add", request):
            self._streams.pop(request.request_id, None)
            raise EngineError("the engine is not running")
        self._queue.enter(request.request_id, len(request.prompt_token_ids))
        finished, ended_choices = False, 0
        try:
            while not finished:
                item = await stream.get()
                self._queue.leave(request.request_id, served=not isinstance(item, BaseException))
                if isinstance(item, BaseException):
                    finished = True  # the engine delivers an error only after dropping the request
                    raise item
                ended_choices += item.finish_reason is not None
                finished = ended_choices == request.params.n  # each choice ends once
                yield item
        finally:
            self._queue.leave(request.request_id, served=False)
            self._streams.pop(request.request_id, None)
            if not finished:  # the consumer went away (client disconnect): free the KV
                self._send("abort", request.request_id)

    def _send(self, kind: str, payload: Any) -> bool:
        """Queues a command for the engine; False once it is closing or gone."""
        worker = self._worker
        if worker is None or not self.is_alive() or not worker.send(kind, payload):
            return False
        self.driver.wake()
        return True

    # -- the worker's LoopSide: called on the loop ---------------------------------------------

    def deliver(self, items: Delivery) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def ended(self, run: str, release: RunRelease, future: asyncio.Future[int]) -> None:
        """The run's aborted streams end with RunEnded, then the caller resumes."""
        self.deliver([(rid, RunEnded(f"run {run} was ended")) for rid in release.aborted])
        settle(future, release.released_blocks)
